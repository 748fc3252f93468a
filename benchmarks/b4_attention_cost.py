"""Protocol B4 (docs/benchmarks.md): one attention layer's time and peak memory against tokens.

Forward + backward of one layer (width 192, 3 heads, batch 1) on N = 64 .. 16384 tokens (a
square patch grid, no class token) for every attention of the registry: ``softmax`` (fused
scaled-dot-product), ``softmax_explicit`` (materialises the maps), ``cbsa`` (m = 64: an 8x8
pool), ``agent`` (CBSA without contraction), ``mssa`` (CRATE), and the linear-cost layers
``linear``, ``efficient``, ``focused_linear``, ``nystrom``, ``performer`` beside the quadratic
``sinkformer``. Each point runs in a fresh
process (``benchmarks.helpers.run_child``). The slope of log-time against log-N (least squares over N >= 1024)
says how each scales: 2 is quadratic, 1 linear. A point whose peak, extrapolated from the
previous N by the layer's slope (at most quadratic), would pass ``--memory-gb`` is not run.

    python -m benchmarks.b4_attention_cost --readme
    python -m benchmarks.b4_attention_cost --tokens 64 256 1024    # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks.helpers import ROOT, machine_line, replace_readme_block, run_child

ATTENTIONS = ("softmax", "softmax_explicit", "cbsa", "agent", "mssa", "linear", "efficient",
              "focused_linear", "nystrom", "performer", "sinkformer")
QUADRATIC_MEMORY = {"softmax_explicit", "mssa", "sinkformer"}

CHILD = r"""
from attnssl.nn.attention import get_attention

name, tokens, dim, heads, pool, repeats = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                           int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
torch.manual_seed(0)
layer = get_attention(name)(dim, num_heads=heads, qkv_bias=True)
layer.num_prefix_tokens = 0
if hasattr(layer, "pool_side"):
    layer.pool_side = pool
x = torch.randn(1, tokens, dim, requires_grad=True)


def step():
    layer(x).sum().backward()
    layer.zero_grad(set_to_none=True)
    x.grad = None


print(json.dumps(timed_peak(step, repeats)))
"""


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(seconds) against log(N)."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(n) for n, _ in points], [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs)


def table(results: dict, tokens: list[int], memory_gb: float) -> str:
    lines = ["| attention | " + " | ".join(f"N={n}" for n in tokens) + " | slope (N >= 1024) |",
             "| --- |" + " --- |" * (len(tokens) + 1)]
    for name, points in results.items():
        cells = []
        for n in tokens:
            p = points.get(n)
            if p is None:
                cells.append("-")
            elif not p.get("fits", True):
                cells.append(f"> {memory_gb:g} GB")
            else:
                cells.append(f"{1000 * p['seconds']:.1f} ms / {p['peak_mb']:.0f} MB")
        fitted = slope([(n, p["seconds"]) for n, p in points.items()
                        if n >= 1024 and p.get("fits", True) and "seconds" in p])
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {'-' if fitted is None else f'{fitted:.2f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=[64, 256, 1024, 4096, 16384])
    parser.add_argument("--attentions", nargs="+", default=list(ATTENTIONS), choices=ATTENTIONS)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--pool", type=int, default=8, help="CBSA/agent pool side (m = pool^2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-gb", type=float, default=12.0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "b4.json"))
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    for n in args.tokens:
        if math.isqrt(n) ** 2 != n:
            raise SystemExit(f"--tokens {n} is not a square patch grid (use 64, 256, 1024 ...)")

    from attnssl.train.environment import machine_description

    machine = machine_description()
    results: dict[str, dict[int, dict]] = {}
    for name in args.attentions:
        results[name] = {}
        previous = None
        for n in sorted(args.tokens):
            if previous is not None:
                power = 2 if name in QUADRATIC_MEMORY else 1
                # at least 1 MB: the smallest points are within resident-memory noise
                predicted = max(previous[1]["peak_mb"], 1.0) * (n / previous[0]) ** power
                if predicted > args.memory_gb * 1024 or not previous[1].get("fits", True):
                    results[name][n] = {"fits": False, "predicted_mb": predicted}
                    previous = (n, results[name][n] | {"peak_mb": predicted})
                    continue
            repeats = args.repeats if n <= 4096 else 2
            point = run_child(CHILD, name, n, args.dim, args.heads, args.pool, repeats)
            results[name][n] = point
            previous = (n, point)
            print(f"{name} N={n}: {point}", flush=True)
    markdown = table(results, sorted(args.tokens), args.memory_gb)
    print(markdown)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "dim": args.dim, "heads": args.heads,
                               "pool": args.pool, "memory_gb": args.memory_gb,
                               "results": {k: {str(n): v for n, v in p.items()}
                                           for k, p in results.items()}}, indent=2))
    if args.readme:
        command = ("python -m benchmarks.b4_attention_cost --tokens "
                   + " ".join(map(str, args.tokens)) + f" --memory-gb {args.memory_gb:g} --readme")
        replace_readme_block("B4", machine_line(machine, command) + "\n\n" + markdown)


if __name__ == "__main__":
    main()
