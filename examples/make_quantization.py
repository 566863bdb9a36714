"""Writes (and with ``--execute``, runs) examples/quantization.ipynb.

Per-layer quantization error of SmolLM2-135M under FireQ's W4A8KV4 recipe, before and
after each smoothing step (``fineserve_jax.quant.analysis``), drawn as plots.

    python examples/make_quantization.py --execute   # about a minute and a half on 2 CPU cores
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import notebook_tools  # noqa: E402

OUT = notebook_tools.HERE / "quantization.ipynb"

CELLS = [
    ("md", """\
# Where FireQ's quantization error comes from, layer by layer

FireQ serves a model with INT4 weights, FP8 activations entering every linear layer, an INT4
KV cache and FP8 queries. Rounding that hard needs the outliers smoothed first. This notebook
builds the recipe one smoothing step at a time and measures, in every layer of SmolLM2-135M,
how far the quantized model is from the float one:

| step | what it adds |
|---|---|
| no smoothing, no pow2 | INT4 weights with FP8 group scales, FP8 activations, INT4 KV, FP8 queries |
| + channel-wise | scales folded into producer -> consumer pairs (norm -> gate/up, up -> down, V -> O) |
| + pow2 per-tensor | a power-of-two multiplier per weight tensor, so small FP8 group scales stay normal |
| + pre-RoPE | each key channel pair scaled by its calibrated maximum, queries inversely |
| + post-RoPE (= `fireq`) | the largest key channels after RoPE scaled online |

Everything runs in float32, so the figures isolate the recipe's rounding from the serving
dtype. About a minute and a half on 2 CPU cores."""),
    ("code", """\
import json
import sys
import time
from pathlib import Path

# From a checkout without `pip install -e .`: put the repository root on the path.
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "fineserve_jax").is_dir())
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt

from checkpoints import load_model
from fineserve_jax.eval import corpus_slice
from fineserve_jax.plots import plot_layer_errors
from fineserve_jax.quant.analysis import fireq_ablation, layer_errors

t_start = time.perf_counter()"""),
    ("md", """\
## The model and the text

SmolLM2-135M in float32 as loaded from its packaged GGUF file, and two sequences of 128
tokens from the start of the packaged Wikipedia text. Key statistics for the RoPE steps
are calibrated on 512 tokens from further into the same text (the recipe uses 20,480;
the shapes of the curves do not change)."""),
    ("code", """\
model = load_model("smollm2-135m", "float32", progress=False)
cfg = model.config
print(cfg.num_layers, "layers, hidden", cfg.hidden_size, "heads", cfg.num_heads, "/",
      cfg.num_kv_heads, "KV heads of", cfg.head_dim)
tokens = corpus_slice(model.tokenizer, 0, 256).reshape(2, 128)
print(repr(model.tokenizer.decode(tokens[0][:24].tolist())), "...")"""),
    ("md", "The five recipes, each a `Precision`:"),
    ("code", """\
steps = fireq_ablation()
for name, p in steps.items():
    sm = p.smoothing
    print(f"{name:30s} pow2={p.weights.pow2!s:5s} channel={bool(sm and sm.channel)!s:5s} "
          f"pre-RoPE={bool(sm and sm.pre_rope)!s:5s} post-RoPE={bool(sm and sm.post_rope)}")"""),
    ("md", """\
## Measuring

`layer_errors` quantizes the model once per step and reports three relative errors
`||quantized - exact|| / ||exact||` per layer: the residual stream after the layer (the
whole model quantized, errors carried from earlier layers included), each linear layer on
its own float inputs, and the attention logits `q.k` with INT4 keys and FP8 queries."""),
    ("code", """\
errors = layer_errors(cfg, model.params, tokens, steps, tokenizer=model.tokenizer,
                      calib_tokens=512, progress=False)
errors"""),
    ("code", "print(errors.table())"),
    ("md", """\
## The residual stream

Error enters in every layer and is carried by the residual stream to the LM head. The
steps do not help every layer alike: compare where the lines sit in the early, middle and
last layers, and which ends lowest at the last layer (what the LM head sees)."""),
    ("code", """\
plot_layer_errors(errors, "stream")
plt.show()"""),
    ("md", """\
## Keys: pre- and post-RoPE scaling

The first three steps leave the keys alone, so their lines coincide. Scaling each RoPE pair
by its calibrated maximum (pre-RoPE) and the largest channels after RoPE (post-RoPE) flattens
the keys before they are rounded to INT4: with both, the logits' error is lower in every
layer."""),
    ("code", """\
plot_layer_errors(errors, "keys")
plt.show()"""),
    ("md", """\
## Linear layers: channel-wise scaling

Channel-wise scaling trades error between the two sides of a pair: the up projection's
outlier rows are scaled down into the down projection's input columns."""),
    ("code", """\
fig, axes = plt.subplots(1, 2, figsize=(12, 3.5), sharey=True)
plot_layer_errors(errors, "w_up", ax=axes[0], title="up projection")
plot_layer_errors(errors, "w_down", ax=axes[1], title="down projection")
axes[0].get_legend().remove()
fig.tight_layout()
plt.show()"""),
    ("md", """\
## And the perplexity

The same steps scored on 16,384 tokens in bf16 (the committed record of
`python -m fineserve_jax.bench accuracy`):"""),
    ("code", """\
record = json.loads((ROOT / "benchmarks" / "results" / "accuracy.json").read_text())
ppl = {r["variant"]: r["ppl"] for r in record["results"]}
print(f"{'bf16 (unquantized)':30s} {ppl['bf16']:.3f}")
for name in steps:
    print(f"{name:30s} {ppl[name]:.3f}")"""),
    ("md", "What the figures above must show, checked:"),
    ("code", """\
first, full = 0, len(errors.steps) - 1
assert errors.stream[full, -1] < errors.stream[first, -1], "smoothing should lower the error"
assert (errors.keys[full] < errors.keys[first]).all(), "RoPE scaling: keys, every layer"
print(f"last-layer stream error {errors.stream[first, -1]:.3f} -> {errors.stream[full, -1]:.3f}; "
      f"key logits {errors.keys[first].mean():.3f} -> {errors.keys[full].mean():.3f}")
print(f"notebook ran in {time.perf_counter() - t_start:.0f} s")"""),
]


def build():
    return notebook_tools.build(CELLS)


def main(argv=None) -> int:
    return notebook_tools.main(CELLS, OUT, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
