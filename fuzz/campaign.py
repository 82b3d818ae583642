"""The fuzzing campaign: ``python -m fuzz.campaign --cases 5000 --seed 1``.

Each case copies one seed checkpoint, mutates one of its files, runs rankscope on it in this process (with a
time limit) and classifies the outcome (fuzz.harness). Failures are grouped by their first line; the summary
says how many cases ran, how many were analysed or refused, and each distinct failure with one reproducer.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from . import corpus, harness, mutations


def mutations_for(path: Path) -> tuple[mutations.Mutation, ...]:
    if path.suffix == ".safetensors":
        return mutations.SAFETENSORS_MUTATIONS
    if path.suffix == ".json":
        return (mutations.json_mutation, mutations.truncate, mutations.flip_bytes)
    return mutations.BYTES_MUTATIONS


def run_campaign(cases: int, seed: int, workdir: Path, *, keep: Path | None = None) -> dict:
    seeds = corpus.build(workdir / "seeds")
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    refusals: Counter[str] = Counter()
    failures: dict[str, dict] = {}
    for index in range(cases):
        name = rng.choice(sorted(seeds))
        original = seeds[name]
        seed_root = workdir / "seeds"
        relative = original.relative_to(seed_root)
        top = seed_root / relative.parts[0]
        case_root = workdir / f"case{index}"
        if top.is_dir():
            shutil.copytree(top, case_root / relative.parts[0])
        else:
            (case_root).mkdir(parents=True, exist_ok=True)
            shutil.copy(top, case_root / relative.parts[0])
        target = case_root / relative
        mutation = rng.choice(mutations_for(target))
        target.write_bytes(mutation(target.read_bytes(), rng))
        given = case_root / relative.parts[0]
        outcome = harness.run(given)
        counts[outcome.kind] += 1
        if outcome.kind == "refused":
            refusals[_reason(outcome.detail)] += 1
        if outcome.kind == "failure":
            signature = outcome.detail.splitlines()[0][:160]
            if signature not in failures:
                failures[signature] = {"seed": name, "mutation": mutation.__name__, "case": index}
                if keep is not None:
                    shutil.copytree(case_root, keep / f"failure{len(failures)}", dirs_exist_ok=True)
        shutil.rmtree(case_root, ignore_errors=True)
    return {
        "cases": cases,
        "seed": seed,
        "outcomes": dict(counts),
        "top_refusals": dict(refusals.most_common(12)),
        "distinct_failures": failures,
    }


def _reason(message: str) -> str:
    """A refusal's message without the case's paths, so that like ones count together."""
    return message.split(": ", 1)[-1][:90]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="copy each distinct failure's files here")
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args(argv)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as work:
        summary = run_campaign(args.cases, args.seed, Path(work), keep=args.keep)
    summary["seconds"] = round(time.monotonic() - start, 1)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if summary["distinct_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
