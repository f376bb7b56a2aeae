"""The official mPLUG-Owl train step, driven by benchmarks/vs_official.py from a separate virtual environment.

Runs in the official code's own environment (torch, transformers 4.28.1, peft 0.3.0) and imports nothing of
owl-jax's: weights come as the official checkpoint directory owl-jax exported (config.json +
model.safetensors, plus a PEFT adapter for stage 2), the batch as an .npz of the official model's inputs.
The step is what `pipeline/train.py` + HF `Trainer` do per optimizer step (no accumulation): forward with
`labels`, `loss.backward()`, `clip_grad_norm_(1.0)`, AdamW `step()`, `zero_grad(set_to_none=True)`.

Protocol (JSON lines): argv[1] is a spec file; the driver prints `{"ready": ..., "trainable": n}` and then, for
each stdin line `steps N`, one `{"step": i, "loss": x, "seconds": t}` per step and `{"done": N}`; `quit`
ends it. Dropout is off (configs patched), float32.
"""

import json
import sys
import time


def _build(spec):
    import numpy as np
    import torch

    sys.path.insert(0, spec["official"])
    from mplug_owl.configuration_mplug_owl import MplugOwlConfig  # noqa: E402
    from mplug_owl.modeling_mplug_owl import MplugOwlForConditionalGeneration  # noqa: E402
    from safetensors.torch import load_file

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    with open(f"{spec['model_dir']}/config.json") as f:
        cfg = json.load(f)
    cfg["vision_config"]["attention_dropout"] = 0.0
    cfg["visual_abstractor_config"]["attention_probs_dropout_prob"] = 0.0
    cfg["visual_abstractor_config"]["hidden_dropout_prob"] = 0.0
    config = MplugOwlConfig(**cfg)
    model = MplugOwlForConditionalGeneration(config).float()
    state = load_file(f"{spec['model_dir']}/model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise SystemExit(f"weights do not match the official model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if spec["stage"] == 1:  # official stage 1: the LLM frozen, vision tower + abstractor + queries trained
        for name, p in model.named_parameters():
            p.requires_grad = not name.startswith("language_model.")
    else:  # pipeline/train.py --use-lora
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
        for p in model.parameters():
            p.requires_grad = False
        lora = spec["lora"]
        model = get_peft_model(model, LoraConfig(target_modules=r".*language_model.*\.(q_proj|v_proj)",
                                                 r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0))
        adapter = load_file(lora["adapter"])
        set_peft_model_state_dict(model, adapter)
        got = {k for k, _ in model.named_parameters() if "lora_" in k}
        if len(got) != len(adapter):
            raise SystemExit(f"adapter has {len(adapter)} tensors, the peft model {len(got)}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=spec["weight_decay"])
    data = np.load(spec["batch"])
    batch = {k: torch.from_numpy(np.ascontiguousarray(data[k])) for k in data.files}
    return model, params, opt, batch


def main():
    import torch

    with open(sys.argv[1]) as f:
        spec = json.load(f)
    out, sys.stdout = sys.stdout, sys.stderr  # the official package prints on import; keep stdout JSON only
    model, params, opt, batch = _build(spec)
    sys.stdout = out
    print(json.dumps({"ready": True, "trainable": sum(p.numel() for p in params),
                      "threads": torch.get_num_threads()}), flush=True)
    step = 0
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        for _ in range(int(cmd[1])):
            t0 = time.perf_counter()
            inputs = dict(batch)
            inputs["labels"] = batch["input_ids"].clone()  # forward() writes -100 into it
            loss = model(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            value = float(loss.detach())
            print(json.dumps({"step": step, "loss": value, "seconds": time.perf_counter() - t0}), flush=True)
            step += 1
        print(json.dumps({"done": int(cmd[1])}), flush=True)


if __name__ == "__main__":
    main()
