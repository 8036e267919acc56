"""Registry lookup latency against a local ``mlflow server`` (started via infra.services) with N versions.

Registers ``--versions`` builds (spread over 10 base models x 2 recipes, each with its own revision) through
``registry.models.register_build`` over REST, then times ``registry.models.lookup`` calls of the kinds services
make: by model+revision+recipe (the nightly skip check), by model+bits+alias (``champion``), by name+alias.
Target: median and p95 below 200 ms. Writes ``benchmarks/results/registry_lookup.json``.

    .venv/bin/python benchmarks/registry_lookup.py [--versions 100] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

from infra.services import free_port, start_mlflow_server
from infra.settings import Settings

TARGET_MS = 200.0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "registry_lookup.json"))
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="qp-reglookup-"))
    t0 = time.perf_counter()
    server = start_mlflow_server(Settings(home=home), port=free_port(), timeout=120)
    startup = time.perf_counter() - t0
    try:
        from registry.models import PromotionGate, lookup, register_build
        from registry.tracking import experiment_id, get_client

        # The client talks REST only; artifacts are proxied by the server (mlflow-artifacts:/).
        client_settings = Settings(
            home=home / "client",
            mlflow_tracking_uri=server.url,
            mlflow_artifact_location="mlflow-artifacts:/quantpipe",
        )
        client = get_client(client_settings)
        exp = experiment_id(client_settings)
        ckpt = home / "ckpt"
        ckpt.mkdir()
        (ckpt / "config.json").write_text('{"model_type": "llama"}')
        (ckpt / "model.safetensors").write_bytes(os.urandom(4096))

        models = [f"bench-model-{i}" for i in range(10)]
        recipes = [("gptq-w4g64", 4), ("gptq-w3g64", 3)]
        registered = []
        reg_times = []
        rng = random.Random(0)
        for i in range(args.versions):
            model = models[i % len(models)]
            recipe, bits = recipes[(i // len(models)) % len(recipes)]
            revision = f"sha256:{i:032x}"
            run = client.create_run(exp, run_name=f"register-{i}")
            ppl = 10 + rng.random()
            t = time.perf_counter()
            info = register_build(
                f"{model}.{recipe}",
                ckpt,
                run_id=run.info.run_id,
                tags={
                    "base_model": model,
                    "base_revision": revision,
                    "recipe": recipe,
                    "bits": str(bits),
                    "recipe_digest": f"d{bits}",
                },
                metrics={"ppl": ppl, "ppl_fp": 10.0},
                build_key=f"bench-{i}",
                gate=PromotionGate(max_ppl_increase=0.5),
                settings=client_settings,
            )
            reg_times.append(time.perf_counter() - t)
            client.set_terminated(run.info.run_id)
            registered.append((model, revision, recipe, bits, info.name))

        kinds = {
            "model+revision+recipe+digest (nightly skip check)": lambda m, r, rc, b, n: lookup(
                model=m, revision=r, recipe=rc, recipe_digest=f"d{b}", settings=client_settings
            ),
            "model+bits+alias=champion": lambda m, r, rc, b, n: lookup(
                model=m, bits=b, alias="champion", settings=client_settings
            ),
            "name+alias=champion": lambda m, r, rc, b, n: lookup(name=n, alias="champion", settings=client_settings),
            "miss (unknown revision)": lambda m, r, rc, b, n: lookup(
                model=m, revision="sha256:none", recipe=rc, settings=client_settings
            ),
        }
        results = {}
        for kind, fn in kinds.items():
            fn(*registered[0])  # warm the connection
            times = []
            for _ in range(args.repeats):
                target = rng.choice(registered)
                t = time.perf_counter()
                found = fn(*target)
                times.append((time.perf_counter() - t) * 1000)
                if kind.startswith("model+revision"):
                    assert found is not None and found.tags["base_revision"] == target[1]
                if kind.startswith("miss"):
                    assert found is None
            results[kind] = {
                "n": len(times),
                "median_ms": round(statistics.median(times), 2),
                "p95_ms": round(pct(times, 0.95), 2),
                "max_ms": round(max(times), 2),
                "meets_200ms_target": pct(times, 0.95) < TARGET_MS,
            }
            print(f"{kind:55s} median {results[kind]['median_ms']:7.2f} ms  p95 {results[kind]['p95_ms']:7.2f} ms")
        n_versions = len(client.search_model_versions("", max_results=1000))
    finally:
        server.stop()
    out = {
        "benchmark": "registry lookup latency via MLflow REST (local mlflow server, sqlite backend)",
        "target_ms": TARGET_MS,
        "versions_registered": n_versions,
        "registered_models": len({r[4] for r in registered}),
        "server_startup_s": round(startup, 2),
        "register_build_median_ms": round(statistics.median(reg_times) * 1000, 1),
        "lookups": results,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
        "notes": "client and server on one 2-core machine; lookups = 1 search_model_versions call (+1 "
        "get_registered_model per matched model for aliases). Another benchmark process shared the CPU.",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
