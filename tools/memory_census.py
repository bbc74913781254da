#!/usr/bin/env python
"""What one training step keeps for backward, by the code that kept it.

    PYTHONPATH=. python tools/memory_census.py --layouts one_doc,mean2k --out $OUT/census.json

Runs the real trainer (tools/bench.py's path: Llama-3-8B-shaped layers, bf16, one 64K row) and,
for one step, records every tensor autograd saves (``torch.autograd.graph.saved_tensors_hooks``):
its storage, counted once however many ops save it, the module whose forward was running and the
innermost project or Megatron frame that saved it. Parameters are left out. Per layer it also
reads the allocator: memory allocated after the layer's forward minus before it (what the layer
left behind: its saved tensors plus its output). Use it to see where activation memory goes
before changing a kernel; the per-layer figure the memory targets use is tools/bench.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict

import torch

sys.path.insert(0, os.getcwd())

from bench import TrainerPath  # noqa: E402
from bench_setup import compose, write_corpus  # noqa: E402

_OWN = os.path.abspath(__file__)


def _saver() -> str:
    """The innermost frame of the project or Megatron-Core that led to this save."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name != _OWN and "megatron" in name and "/torch/" not in name and "cpu_compat" not in name:
            return f"{os.path.basename(name)}:{f.f_code.co_name}:{f.f_lineno}"
        f = f.f_back
    return "?"


class Census:
    def __init__(self, model: torch.nn.Module) -> None:
        self.stack: list[str] = []
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, dict] = {}
        self.layer_delta: dict[str, float] = {}
        self._handles = []
        for name, mod in model.named_modules():
            self._handles.append(mod.register_forward_pre_hook(self._enter(name)))
            self._handles.append(mod.register_forward_hook(self._leave(name)))

    def _enter(self, name: str):
        def hook(_mod, _args):
            self.stack.append(name)
            if _is_layer(name) and torch.cuda.is_available():
                torch.cuda.synchronize()
                self.layer_delta[name] = -torch.cuda.memory_allocated()
        return hook

    def _leave(self, name: str):
        def hook(_mod, _args, _out):
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            if _is_layer(name) and torch.cuda.is_available():
                torch.cuda.synchronize()
                self.layer_delta[name] += torch.cuda.memory_allocated()
        return hook

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta" and not isinstance(t, torch.nn.Parameter):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.params and ptr not in self.seen:
                self.seen[ptr] = {"module": self.stack[-1] if self.stack else "", "saver": _saver(),
                                  "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                                  "bytes": t.untyped_storage().nbytes()}
        return t

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def table(self) -> dict:
        by_layer: dict[str, float] = defaultdict(float)
        rows = []
        for r in self.seen.values():
            layer = _layer_of(r["module"])
            by_layer[layer] += r["bytes"]
            if layer.endswith("layers.0"):
                rows.append(r)
        rows.sort(key=lambda r: -r["bytes"])
        return {"saved_gib_by_layer": {k: v / 2**30 for k, v in sorted(by_layer.items())},
                "allocated_delta_gib_by_layer": {k: v / 2**30 for k, v in sorted(self.layer_delta.items())},
                "layer0": rows}


def _is_layer(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] == "layers" and parts[-1].isdigit()


def _layer_of(module: str) -> str:
    parts = module.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "layers" and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return module or "(outside modules)"


def census(path: TrainerPath, layout: str) -> dict:
    path.use_layout(layout)
    path.step()  # compiles and builds graphs outside the hooks
    c = Census(path.trainer.model)
    try:
        with torch.autograd.graph.saved_tensors_hooks(c.pack, lambda t: t):
            path.step()
    finally:
        c.close()
    return c.table()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--seq", type=int, default=65536)
    p.add_argument("--model", default="llama3_8b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--layouts", default="one_doc,mean2k", type=lambda s: s.split(","))
    p.add_argument("--extra", default="", type=lambda s: [x for x in s.split(",") if x],
                   help="config overrides (e.g. train.recompute=selective)")
    args = p.parse_args(argv)

    from megatron_prolong.parallel.cpu_compat import cpu_compat
    from megatron_prolong.parallel.distributed import init_distributed, shutdown

    report = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "seq": args.seq, "layers": args.layers, "extra": args.extra, "layouts": {}}
    with tempfile.TemporaryDirectory() as tmp, cpu_compat():
        probe = compose([f"model={args.model}"] + args.extra)
        vocab = probe.model.vocab_size or 258
        write_corpus(tmp, args.seq, 8, vocab, args.layouts)
        cfg = compose([f"model={args.model}", f"model.num_layers={args.layers}", f"data.seq_length={args.seq}",
                       "train.global_batch_size=1", "train.micro_batch_size=1", "train.precision=bf16",
                       "train.steps=1000", "data.synthetic=false", f"data.root={tmp}", f"run.dir={tmp}/run",
                       "checkpoint.save_interval=0", "log.tensorboard=false", "data.balance_micro_batches=false",
                       "model.attention_backend=plugin",
                       f"data.mixture=[{{name:{args.layouts[0]},path:{args.layouts[0]},share:1.0}}]", *args.extra])
        topo = init_distributed(probe.parallel, seed=1234)
        try:
            path = TrainerPath(cfg, topo)
            for name in args.layouts:
                t = report["layouts"][name] = census(path, name)
                print(f"[census] {name}: saved GiB by layer {json.dumps(t['saved_gib_by_layer'])}")
                print(f"[census] {name}: allocated after - before each layer's forward (GiB) "
                      f"{json.dumps(t['allocated_delta_gib_by_layer'])}")
                for r in t["layer0"]:
                    print(f"  {r['bytes'] / 2**20:9.1f} MiB  {r['dtype']:9s} {str(r['shape']):24s} "
                          f"{r['module'].split('layers.0.')[-1]:40s} {r['saver']}")
        finally:
            shutdown()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
