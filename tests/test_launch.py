"""Launchers: the exact commands/files each dry-run prints, and that the printed quoting survives the shells
it goes through (run against fake `gcloud`/`curl`/python stand-ins; no cloud, no JAX processes)."""

import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from launch import gke_jobset, local, slurm, tpu_pod

TRAIN = ["--", "--config", "configs/tiny.yaml", "training.run_name=my run", "data.paths=[a,b]"]


def _script(path, body):
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


# ---------------------------------------------------------------- local


def test_local_dry_run_exact(capsys, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert local.main(["--processes", "2", "--devices", "4", "--port", "12355", "--log-dir", "runs/mp logs",
                       "--python", "python", "--dry-run", *TRAIN]) == 0
    common = ("JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 "
              "OWL_COORDINATOR_ADDRESS=127.0.0.1:12355 OWL_NUM_PROCESSES=2 OWL_PROCESS_ID={i} OWL_INIT_TIMEOUT=120 "
              "OWL_HEARTBEAT_TIMEOUT=30 OWL_SHUTDOWN_TIMEOUT=30 python -m owl_jax.train --config configs/tiny.yaml 'training.run_name=my run' "
              "'data.paths=[a,b]' > 'runs/mp logs/process_{i}.log' 2>&1")
    assert capsys.readouterr().out == common.format(i=0) + "\n" + common.format(i=1) + "\n"


def test_local_plan_replaces_only_the_device_count_flag():
    plans = local.plan(3, 2, 1, "logs", TRAIN, base_env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --a=1"})
    assert [p.env["XLA_FLAGS"] for p in plans] == ["--a=1 --xla_force_host_platform_device_count=2"] * 3
    assert [p.env["OWL_PROCESS_ID"] for p in plans] == ["0", "1", "2"]
    assert [p.log for p in plans] == [f"logs/process_{i}.log" for i in range(3)]
    assert plans[0].argv[3:] == TRAIN[1:]


def test_local_needs_train_args():
    with pytest.raises(SystemExit, match="--config"):
        local.plan(2, 4, 1, "logs", ["training.steps=3"])


def _plan(i, code, log_dir):
    return local.ProcessPlan(i, {"OWL_PROCESS_ID": str(i)}, [sys.executable, "-c", code], str(log_dir / f"p{i}.log"))


def test_local_run_stops_the_others_when_one_dies(tmp_path):
    sleeper = "import os, time; print('up', os.environ['OWL_PROCESS_ID'], flush=True); time.sleep(120)"
    plans = [_plan(0, sleeper, tmp_path), _plan(1, "import sys; print('boom'); sys.exit(3)", tmp_path)]
    start = time.time()
    assert local.run(plans, grace_s=5) == 3
    assert time.time() - start < 30
    assert (tmp_path / "p1.log").read_text().strip() == "boom"


def test_local_run_reports_a_killed_process_like_a_shell(tmp_path):
    plans = [_plan(0, "import time; time.sleep(120)", tmp_path),
             _plan(1, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", tmp_path)]
    assert local.run(plans, grace_s=5) == 128 + 9


def test_local_run_all_succeed(tmp_path):
    code = "import os; print('hello', os.environ['OWL_PROCESS_ID'])"
    assert local.run([_plan(i, code, tmp_path) for i in range(2)]) == 0
    assert [(tmp_path / f"p{i}.log").read_text() for i in range(2)] == ["hello 0\n", "hello 1\n"]


# ---------------------------------------------------------------- TPU pod


def test_tpu_pod_single_slice_dry_run_exact(capsys):
    assert tpu_pod.main(["--name", "owl", "--zone", "us-west4-a", "--project", "p1", "--git-url",
                         "https://example.com/owl-jax.git", "--ref", "v0.1.0", "--env", "WANDB_MODE=offline",
                         "--dry-run", *TRAIN]) == 0
    where = "--zone us-west4-a --project p1 --worker=all"
    worker = tpu_pod.METADATA_WORKER.replace("'", "'\"'\"'")
    assert capsys.readouterr().out == (
        "#!/bin/bash\nset -euo pipefail\n"
        f"gcloud compute tpus tpu-vm ssh owl {where} --command 'set -e; [ -d owl-jax/.git ] || git clone -q "
        "https://example.com/owl-jax.git owl-jax; cd owl-jax; git fetch -q origin v0.1.0; git checkout -q --detach "
        "FETCH_HEAD; cd; python3 -m venv owl-venv; owl-venv/bin/pip install -q --upgrade pip; owl-venv/bin/pip "
        "install -q -e '\"'\"'owl-jax[tpu]'\"'\"''\n"
        f"gcloud compute tpus tpu-vm ssh owl {where} --command 'mkdir -p $HOME/owl-logs && W=$({worker} || hostname) "
        "&& cd owl-jax && WANDB_MODE=offline $HOME/owl-venv/bin/python -m owl_jax.train --config configs/tiny.yaml "
        "'\"'\"'training.run_name=my run'\"'\"' '\"'\"'data.paths=[a,b]'\"'\"' > $HOME/owl-logs/slice0-worker$W.log 2>&1'\n")


def test_tpu_pod_create_and_skip_setup():
    spec = tpu_pod.PodSpec("owl", "z", num_slices=2, accelerator_type="v5litepod-16",
                           runtime_version="v2-alpha-tpuv5-lite")
    text = tpu_pod.script(spec, TRAIN, create=True, setup=False)
    assert text.splitlines()[2] == ("gcloud compute tpus queued-resources create owl --zone z --accelerator-type "
                                    "v5litepod-16 --runtime-version v2-alpha-tpuv5-lite --node-count 2 --node-prefix owl")
    assert text.splitlines()[3] == ("until [ \"$(gcloud compute tpus queued-resources describe owl --zone z "
                                    "'--format=value(state.state)')\" = ACTIVE ]; do sleep 30; done")
    assert "pip install" not in text
    with pytest.raises(SystemExit, match="--git-url"):
        tpu_pod.script(tpu_pod.PodSpec("owl", "z"), TRAIN)


@pytest.fixture
def fake_cloud(tmp_path, monkeypatch):
    """`gcloud` that records each argv (one JSON list a line, in one O_APPEND write: the slices of a
    multi-slice launch call it concurrently) and answers `describe` with an IP."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "gcloud_calls.jsonl"
    _script(bin_dir / "gcloud", f"""\
        {sys.executable} -c 'import json, os, sys; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT); os.write(fd, (json.dumps(sys.argv[2:]) + "\\n").encode())' {record} "$@"
        case "$*" in *describe*) echo 10.1.2.3;; esac
        """)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return record


def test_tpu_pod_dry_run_executes_nothing(fake_cloud, capsys):
    assert tpu_pod.main(["--name", "owl", "--zone", "z", "--num-slices", "2", "--wheel", "dist/o.whl",
                         "--dry-run", *TRAIN]) == 0
    assert not fake_cloud.exists()
    out = capsys.readouterr().out
    assert "COORDINATOR=$(gcloud compute tpus tpu-vm describe owl-0 --zone z" in out
    assert out.count(" &\npids+=($!)") == 2


def test_tpu_pod_multi_slice_commands_survive_both_shells(fake_cloud, tmp_path):
    """Run the generated script with the fake gcloud, then run the recorded remote command of slice 1 on a
    fake worker (HOME with a stand-in venv python and metadata curl): the env, args and log path arrive intact."""
    import json
    assert tpu_pod.main(["--name", "owl", "--zone", "z", "--num-slices", "2", "--wheel", "dist/o.whl", *TRAIN]) == 0
    calls = [json.loads(line) for line in fake_cloud.read_text().splitlines()]
    assert calls[:3] == [
        ["compute", "tpus", "tpu-vm", "ssh", "owl-0", "--zone", "z", "--worker=all", "--command", "mkdir -p owl-jax"],
        ["compute", "tpus", "tpu-vm", "scp", "--recurse", "dist/o.whl", "configs", "owl-0:owl-jax/", "--zone", "z",
         "--worker=all"],
        ["compute", "tpus", "tpu-vm", "ssh", "owl-0", "--zone", "z", "--worker=all", "--command",
         "set -e; python3 -m venv owl-venv; owl-venv/bin/pip install -q --upgrade pip; "
         "owl-venv/bin/pip install -q 'owl-jax/o.whl[tpu]'"]]
    runs = {c[4]: c[-1] for c in calls if c[3] == "ssh" and "owl_jax.train" in c[-1]}
    assert set(runs) == {"owl-0", "owl-1"}
    remote = runs["owl-1"]
    assert "MEGASCALE_COORDINATOR_ADDRESS=10.1.2.3:8080 MEGASCALE_NUM_SLICES=2 MEGASCALE_SLICE_ID=1" in remote

    home = tmp_path / "worker_home"
    (home / "owl-jax").mkdir(parents=True)
    (home / "owl-venv" / "bin").mkdir(parents=True)
    _script(home / "owl-venv" / "bin" / "python", """\
        echo "coord=$MEGASCALE_COORDINATOR_ADDRESS slice=$MEGASCALE_SLICE_ID cwd=$(basename "$PWD")"
        for a in "$@"; do echo "arg=$a"; done
        """)
    wbin = tmp_path / "wbin"
    wbin.mkdir()
    _script(wbin / "curl", "echo 3\n")
    env = {"HOME": str(home), "PATH": f"{wbin}:/usr/bin:/bin"}
    subprocess.run(["bash", "-c", remote], env=env, cwd=home, check=True)
    assert (home / "owl-logs" / "slice1-worker3.log").read_text().splitlines() == [
        "coord=10.1.2.3:8080 slice=1 cwd=owl-jax", "arg=-m", "arg=owl_jax.train", "arg=--config",
        "arg=configs/tiny.yaml", "arg=training.run_name=my run", "arg=data.paths=[a,b]"]


# ---------------------------------------------------------------- GKE / xpk


def _yaml_out(capsys):
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    body, then = rest.rsplit("# then: ", 1)
    return first, yaml.safe_load(body), then.strip()


def test_gke_tpu_multislice_jobset(capsys):
    assert gke_jobset.main(["--name", "owl-s1", "--image", "img:v1", "--accelerator", "tpu-v5-lite-podslice",
                            "--topology", "4x4", "--hosts", "4", "--num-slices", "2", "--env", "WANDB_MODE=offline",
                            "--dry-run", *TRAIN]) == 0
    header, doc, then = _yaml_out(capsys)
    assert header == "# owl-s1.jobset.yaml" and then == "kubectl apply -f owl-s1.jobset.yaml"
    rj = doc["spec"]["replicatedJobs"][0]
    assert (rj["name"], rj["replicas"]) == ("slice", 2)
    job = rj["template"]["spec"]
    assert (job["parallelism"], job["completions"], job["completionMode"]) == (4, 4, "Indexed")
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                   "cloud.google.com/gke-tpu-topology": "4x4"}
    assert pod["hostNetwork"] is True
    c = pod["containers"][0]
    assert c["command"] == ["bash", "-c", "python -m owl_jax.train --config configs/tiny.yaml "
                                          "'training.run_name=my run' 'data.paths=[a,b]'"]
    assert c["resources"] == {"limits": {"google.com/tpu": 4}}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"
    assert env["MEGASCALE_NUM_SLICES"] == "2" and env["MEGASCALE_PORT"] == "8080"
    assert env["MEGASCALE_SLICE_ID"] == {"fieldRef": {"fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}
    assert env["WANDB_MODE"] == "offline"
    assert [e["name"] for e in c["env"]][:2] == ["JOBSET_NAME", "REPLICATED_JOB_NAME"]  # defined before use


def test_gke_gpu_jobset_has_explicit_spec(capsys):
    assert gke_jobset.main(["--name", "owl-g", "--image", "img", "--kind", "gpu", "--accelerator",
                            "nvidia-h100-80gb", "--hosts", "2", "--chips-per-host", "8", "--dry-run", *TRAIN]) == 0
    _, doc, _ = _yaml_out(capsys)
    pod = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert "hostNetwork" not in pod and pod["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 8}}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["containers"][0]["env"]}
    assert env["OWL_COORDINATOR_ADDRESS"] == "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME):12355"
    assert env["OWL_NUM_PROCESSES"] == "2"
    assert env["OWL_PROCESS_ID"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}


def test_gke_topology_must_match_hosts():
    with pytest.raises(ValueError, match="16 chips but --hosts 2"):
        gke_jobset.jobset("n", "i", TRAIN, accelerator="a", topology="4x4", hosts=2)


def test_xpk_command_exact(capsys):
    assert gke_jobset.main(["--name", "owl-s1", "--image", "img:v1", "--xpk", "--cluster", "c1", "--tpu-type",
                            "v5litepod-16", "--num-slices", "2", "--zone", "us-west4-a", "--dry-run", *TRAIN]) == 0
    assert capsys.readouterr().out == (
        "xpk workload create --cluster c1 --workload owl-s1 --tpu-type v5litepod-16 --num-slices 2 --docker-image "
        "img:v1 --zone us-west4-a --command 'python -m owl_jax.train --config configs/tiny.yaml "
        "'\"'\"'training.run_name=my run'\"'\"' '\"'\"'data.paths=[a,b]'\"'\"''\n")


# ---------------------------------------------------------------- SLURM


def test_slurm_per_gpu_dry_run_exact(capsys, tmp_path):
    assert slurm.main(["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "2:00:00",
                       "--workdir", "/shared/owl jax", "--venv", "/shared/venv", "--log-dir", "/shared/logs",
                       "--output", str(tmp_path / "s.sbatch"), "--dry-run", *TRAIN]) == 0
    out = capsys.readouterr().out
    assert out == textwrap.dedent(f"""\
        # {tmp_path / 's.sbatch'}
        #!/bin/bash
        #SBATCH --job-name=owl-jax
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=4
        #SBATCH --gpus-per-node=4
        #SBATCH --exclusive
        #SBATCH --output=/shared/logs/%x-%j.out
        #SBATCH --partition=gpu
        #SBATCH --time=2:00:00
        set -euo pipefail
        cd '/shared/owl jax'
        source /shared/venv/bin/activate
        export OWL_INIT_TIMEOUT=600
        export OWL_HEARTBEAT_TIMEOUT=100
        mkdir -p /shared/logs
        srun --kill-on-bad-exit=1 --output=/shared/logs/%x-%j-task%t.log python -m owl_jax.train --config configs/tiny.yaml 'training.run_name=my run' 'data.paths=[a,b]'
        # then: sbatch {tmp_path / 's.sbatch'}
        """)
    assert not (tmp_path / "s.sbatch").exists()
    script = out.split("\n", 1)[1].rsplit("# then:", 1)[0]
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_slurm_per_node_sees_all_gpus():
    text = slurm.sbatch_script(slurm.SlurmSpec(nodes=4, gpus_per_node=8, tasks="per-node", port=23456), TRAIN)
    assert "#SBATCH --ntasks-per-node=1\n" in text
    assert "export OWL_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7\n" in text
    assert "export JAX_COORDINATOR_PORT=23456\n" in text
