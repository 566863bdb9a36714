"""Writes (and with ``--execute``, runs) examples/quickstart.ipynb.

The notebook is kept as code here so changes to it are reviewable; the .ipynb beside it
is this script's output, committed with its outputs so it reads on GitHub without a run.

    python examples/make_quickstart.py --execute   # about a minute and a half on 2 CPU cores
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import notebook_tools  # noqa: E402

OUT = notebook_tools.HERE / "quickstart.ipynb"

CELLS = [
    ("md", """\
# fineserve-jax quickstart

Load SmolLM2-135M in bf16, generate and stream; load it again as fireq-g32 (INT4 weights,
FP8 activations, INT4 KV) and compare answers; then put both in one `Engine` that shares
one KV pool, run a burst of requests and watch the pool's rows move between the models.
Everything here runs on a CPU in a minute or two; token counts are kept tiny."""),
    ("code", """\
import sys
import time
from pathlib import Path

# From a checkout without `pip install -e .`: put the repository root on the path.
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "fineserve_jax").is_dir())
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt

from fineserve_jax import LLM, SamplingParams
from fineserve_jax.plots import plot_attainment, plot_pool_timeline, sample_pool

t_start = time.perf_counter()
GREEDY = SamplingParams(max_tokens=12, temperature=0)"""),
    ("md", """\
## One model in bf16

`LLM` loads the packaged SmolLM2-135M and runs it on an engine of its own."""),
    ("code", """\
bf16 = LLM("smollm2-135m", precision="bf16", dtype="bfloat16", progress=False,
           kv_budget_bytes=16 * 2**20)
print(bf16)
out = bf16.generate(["The capital of France is"], GREEDY)[0]
print(repr(out.text), out.finish_reason)"""),
    ("md", "Streaming yields text as it is generated:"),
    ("code", """\
for delta in bf16.stream("Once upon a time", SamplingParams(max_tokens=20, seed=0)):
    print(delta, end="", flush=True)"""),
    ("md", """\
## The same model in fireq-g32

fireq-g32 quantizes the weights to INT4 in groups of 32, the activations and queries to
FP8 and the KV cache to INT4, after smoothing calibrated on sample text. The recipe
calibrates on 20,480 tokens; 512 keep this quick. The quantized checkpoint is cached
under `~/.cache/fineserve-jax`, so only the first run pays for quantization."""),
    ("code", """\
from checkpoints.cache import cached_checkpoint, with_calibration
from fineserve_jax.precisions import get_precision

recipe = with_calibration(get_precision("fireq-g32"), 512)
path, made = cached_checkpoint("smollm2-135m", recipe, "bfloat16", progress=False)
print("quantized now" if made else "from the cache:", path.name)
fireq = LLM(path, dtype="bfloat16", progress=False, kv_budget_bytes=16 * 2**20)
print(f"{fireq.precision}: {fireq.config.num_params() / 1e6:.0f}M parameters, "
      f"loaded in {fireq.load_seconds:.1f} s")"""),
    ("code", """\
prompts = ["The capital of France is", "Water boils at a temperature of",
           "The three primary colors are"]
for p in prompts:  # one at a time: the batch-of-one shapes are compiled already
    a, b = bf16.generate(p, GREEDY)[0], fireq.generate(p, GREEDY)[0]
    same = sum(x == y for x, y in zip(a.token_ids, b.token_ids))
    print(f"{p!r}\\n  bf16 : {a.text!r}\\n  fireq: {b.text!r}  ({same}/{len(a.token_ids)} "
          f"tokens equal)")"""),
    ("md", """\
## Two models, one KV pool

Both models go into one `Engine`. The pool is small on purpose (a few MiB): whichever
model has work takes free rows (slabs), and gives them back when its requests finish.
`start(thread=False)` compiles every step shape first (the warm-up), then lets the next
cell step the engine itself and sample the pool after each step."""),
    ("code", """\
from fineserve_jax.engine import Engine, EngineConfig
from fineserve_jax.precisions import Precision

engine = Engine(EngineConfig(
    kv_budget_bytes=4 * 2**20, max_model_len=128, max_seqs=8, warmup=True,
    decode_buckets=(8,), max_prefill_seqs=4, prefill_token_budget=64,
    prefill_row_buckets=(4,), chunk_buckets=(16,), context_buckets=(8,)))
engine.add_model("bf16", bf16.config, bf16.engine.weights(bf16.name), bf16.tokenizer,
                 dtype="bfloat16")
engine.add_model("fireq", fireq.config, fireq.engine.weights(fireq.name), fireq.tokenizer,
                 dtype="bfloat16",
                 precision=Precision.from_dict(fireq.metadata["precision_recipe"]))
t0 = time.perf_counter()
engine.start(thread=False)
print(f"warm-up {time.perf_counter() - t0:.1f} s")
print(engine.stats().pool)"""),
    ("code", """\
burst = ["The capital of France is", "Water boils at", "1, 2, 3, 4,", "The quick brown fox",
         "The three primary colors are", "def fibonacci(n):", "A haiku about autumn:",
         "Photosynthesis is"]
short = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
handles = [engine.submit(m, p, short) for m in ("bf16", "fireq") for p in burst]  # 16
t0 = time.perf_counter()
samples = sample_pool(engine, handles, step=True)
print(f"{len(handles)} requests, {len(samples)} samples, {time.perf_counter() - t0:.1f} s")
print(engine.stats())"""),
    ("code", """\
plot_pool_timeline(samples)
plt.show()"""),
    ("md", """\
## SLO attainment of the serving systems

`python -m fineserve_jax.bench serve --systems ...` replays one workload against
fineserve and the baselines (static partitions, fixed pages, Prism) at several request
rates; the committed CPU record:"""),
    ("code", """\
plot_attainment(ROOT / "benchmarks" / "results" / "serve_systems_cpu.json")
plt.show()
print(f"notebook ran in {time.perf_counter() - t_start:.0f} s")"""),
]


def build():
    return notebook_tools.build(CELLS)


def main(argv=None) -> int:
    return notebook_tools.main(CELLS, OUT, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
