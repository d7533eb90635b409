"""How long plan() takes for a spec of 1,000 models against an observed state of 1,000.

Baseline in the same run: the cost of building the Spec itself (pydantic validation of 1,000
models), so the figure is read against something measured on this machine now.
Usage: python benchmarks/plan_bench.py [N]
"""

from __future__ import annotations

import statistics
import sys
import time

from reconciler.plan import Observed, ObservedModel, plan
from reconciler.spec import ModelSpec, Spec
from reconciler.state import ModelState


def main(n: int = 1000, rounds: int = 30) -> None:
    raw = {f"m{i}": {"path": f"/m/{i}.gguf", "n_ctx": 4096, "aliases": [f"a{i}"]} for i in range(n)}
    t = time.perf_counter()
    spec = Spec(models={k: ModelSpec.model_validate(v) for k, v in raw.items()}, active="m0")
    build_ms = (time.perf_counter() - t) * 1000
    # observed: 1,000 running, a tenth with another n_ctx (reload), 50 extra (unload)
    observed_models = {}
    for i in range(n):
        model = spec.models[f"m{i}"]
        if i % 10 == 0:
            model = model.model_copy(update={"n_ctx": 2048})
        observed_models[f"m{i}"] = ObservedModel(model, "llama-server", ModelState.LOADED)
    for i in range(50):
        observed_models[f"gone{i}"] = ObservedModel(ModelSpec(path="/m/x.gguf"), "llama-server", ModelState.LOADED)
    observed = Observed(observed_models, "m0")
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        p = plan(spec, observed)
        times.append((time.perf_counter() - t) * 1000)
    converged = Observed({k: ObservedModel(m, "llama-server", ModelState.LOADED) for k, m in spec.models.items()},
                         "m0")
    t = time.perf_counter()
    assert plan(spec, converged).empty
    noop_ms = (time.perf_counter() - t) * 1000
    p50 = statistics.median(times)
    print(f"plan(): {n} models in the spec vs {len(observed_models)} observed -> {len(p.actions)} actions")
    print(f"  p50 {p50:.1f} ms, min {min(times):.1f} ms, max {max(times):.1f} ms over {rounds} rounds "
          f"(goal: well under 50 ms)")
    print(f"  first call, which also hashes the spec for its generation: {times[0]:.1f} ms")
    print(f"  converged spec (no actions): {noop_ms:.1f} ms")
    print(f"  baseline, validating the same {n} models with pydantic: {build_ms:.1f} ms "
          f"(plan p50 = {p50 / build_ms:.2f}x of it)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
