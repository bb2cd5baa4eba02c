"""``costeer models [list | install NAME... | path NAME...]``: the model presets."""

from __future__ import annotations

import time

from ..models import PRESETS, CoSteerModelError, cache_root, describe_presets, preset_model_dir, resolve_model
from .common import UsageError


def run(args) -> int:
    if args.action == "list":
        if args.names:
            raise UsageError("'costeer models list' takes no names")
        print(f"{'preset':<30} {'role':<6} {'GGUF':>9}  {'installed':<28} model")
        for r in describe_presets():
            installed = ", ".join(r["installed"]) or "-"
            print(f"{r['name']:<30} {r['role']:<6} {r['gguf_mib']:>6.0f} MiB  {installed:<28} {r['title']}")
        print(f"cache: {cache_root()} (set COSTEER_CACHE to move it)")
        return 0
    if not args.names:
        raise UsageError(f"name a preset to {args.action} ({', '.join(PRESETS)} or 'all')")
    names = list(PRESETS) if args.names == ["all"] else args.names
    for name in names:
        if name.strip().lower() not in PRESETS:
            raise CoSteerModelError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    for name in names:
        if args.action == "path":
            print(preset_model_dir(name, args.dtype))
            continue
        t0 = time.perf_counter()
        path = resolve_model(name, args.dtype)
        print(f"{name}: {path} ({time.perf_counter() - t0:.0f} s)")
    return 0
