"""Run NVIDIA kvpress presses on pre-tokenised tasks and write one JSON line per (sample, press).

Standalone on purpose: it imports only the standard library, torch, transformers and kvpress,
never ``tokensparse``, because it runs under the interpreter of the separate ``.venv-kvpress``
environment (kvpress 0.5.5 pins ``transformers<5.3``; the project uses 5.24). The main-env side is
``tokensparse.eval.peers.kvpress.run_kvpress``; see ``docs/peers.md`` for the protocol.

Usage::

    .venv-kvpress/bin/python kvpress_worker.py --model-dir DIR --tasks tasks.jsonl --out results.jsonl \
        --presses dense,snapkv:0.5,streaming_llm:0.5 --placement after --threads 1

Prompts are never re-tokenised: ``context_ids`` / ``question_ids`` come from tokensparse's tokenizer,
so every library sees the same token ids (no BOS is added). The tokenizer is loaded only to decode
the generated ids.

Driver (the same for "dense" and for every press), reproducing ``KVPressTextGenerationPipeline._forward``:

* placement ``after`` (kvpress's default, question-agnostic): ``model.model(context)`` inside
  ``with press(model):`` compresses the cache; then the question ids are fed outside the press at
  absolute positions ``len(context) + arange`` (the original length, so a pruned cache keeps gaps
  in RoPE positions, exactly as the pipeline does), followed by greedy decoding.
* placement ``inside`` (query-aware, kvpress ``evaluate.py --query_aware``): the question is appended
  to the context before compression. The compressed prefill holds context + question[:-1] and only
  the last question token is fed afterwards, because the model needs one forward outside the press
  to produce the first answer logits.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

# Run as a script, this file's folder is sys.path[0], and it holds tokensparse's own ``kvpress.py``
# (the main-env launcher), which would shadow the real kvpress package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

PLACEMENTS = ("after", "inside")
DENSE_NAMES = ("dense", "none", "no_press")


# --------------------------------------------------------------------------------------------------
# press specs
# --------------------------------------------------------------------------------------------------

def _press_factories():
    """Short names accepted by ``--presses`` -> ``(factory(ratio) -> press, needs_eager)``."""
    import kvpress as kp

    return {
        "snapkv": (lambda r: kp.SnapKVPress(compression_ratio=r), False),
        "streaming_llm": (lambda r: kp.StreamingLLMPress(compression_ratio=r), False),
        "expected_attention": (lambda r: kp.ExpectedAttentionPress(compression_ratio=r), False),
        "tova": (lambda r: kp.TOVAPress(compression_ratio=r), False),
        "knorm": (lambda r: kp.KnormPress(compression_ratio=r), False),
        "random": (lambda r: kp.RandomPress(compression_ratio=r, seed=0), False),
        "keydiff": (lambda r: kp.KeyDiffPress(compression_ratio=r), False),
        "lagkv": (lambda r: kp.LagKVPress(compression_ratio=r), False),
        "leverage": (lambda r: kp.LeverageScorePress(compression_ratio=r), False),
        "non_causal_attn": (lambda r: kp.NonCausalAttnPress(compression_ratio=r), False),
        "compactor": (lambda r: kp.CompactorPress(compression_ratio=r), False),
        "cur": (lambda r: kp.CURPress(compression_ratio=r), False),
        "cap": (lambda r: kp.CapPress(compression_ratio=r), False),
        # ObservedAttention needs the attention matrix, which only eager attention returns
        "observed_attention": (lambda r: kp.ObservedAttentionPress(compression_ratio=r), True),
        "critical_snapkv": (lambda r: kp.CriticalKVPress(kp.SnapKVPress(compression_ratio=r)), False),
        "chunkkv_snapkv": (lambda r: kp.ChunkKVPress(kp.SnapKVPress(compression_ratio=r)), False),
        # head-wise presses compress by masking: the cache keeps its full length (see docs/peers.md)
        "adakv_snapkv": (lambda r: kp.AdaKVPress(kp.SnapKVPress(compression_ratio=r)), False),
        # what kvpress's evaluation registry calls "expected_attention"
        "adakv_expected_attention": (
            lambda r: kp.AdaKVPress(kp.ExpectedAttentionPress(compression_ratio=r, epsilon=1e-2)),
            False,
        ),
    }


def parse_presses(spec: str) -> list[tuple[str, float]]:
    """``"dense,snapkv:0.5,tova:0.8"`` -> ``[("dense", 0.0), ("snapkv", 0.5), ("tova", 0.8)]``."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, ratio = item.partition(":")
        name = name.strip().lower()
        if name in DENSE_NAMES:
            out.append(("dense", 0.0))
            continue
        if not ratio:
            raise ValueError(f"press {name!r} needs a compression ratio, e.g. {name}:0.5")
        r = float(ratio)
        if not 0.0 <= r < 1.0:
            raise ValueError(f"compression ratio of {name!r} must be in [0, 1), got {r}")
        out.append((name, r))
    if not out:
        raise ValueError("--presses is empty")
    return out


def press_label(press) -> str:
    """Class name, with the inner press for wrappers: ``AdaKVPress(ExpectedAttentionPress)``."""
    if press is None:
        return "none"
    inner = getattr(press, "press", None)
    if inner is not None and hasattr(inner, "compress"):
        return f"{type(press).__name__}({press_label(inner)})"
    return type(press).__name__


# --------------------------------------------------------------------------------------------------
# instrumentation: time spent compressing and which needle positions survive
# --------------------------------------------------------------------------------------------------

class CompressProbe:
    """Wraps ``press.compress`` on the instance to time it and record kept needle positions.

    Kept positions are recovered by matching the compressed keys against the pre-compression keys
    (exact equality: eviction presses gather rows unchanged, and post-RoPE keys at different
    positions never coincide), so it works for any physically pruning press, not only
    ScorerPresses. A sample of kept rows is checked to match; if a press transforms keys (key
    re-rotation, merging) the probe reports ``None`` instead of a wrong number. Head-wise presses
    that mask (AdaKV & co.) are read from ``module.masked_key_indices``.
    """

    def __init__(self, press, needle_positions: list[int]):
        self.press = press
        self.needle = torch.tensor(sorted(set(int(p) for p in needle_positions)), dtype=torch.long)
        self.compress_s = 0.0
        self.per_layer: dict[int, float | None] = {}
        self._orig = press.compress

    def __enter__(self):
        orig = self._orig

        def compress(module, hidden_states, keys, values, attentions, kwargs):
            t0 = time.perf_counter()
            new_keys, new_values = orig(module, hidden_states, keys, values, attentions, kwargs)
            self.compress_s += time.perf_counter() - t0
            if self.needle.numel():
                self.per_layer[int(module.layer_idx)] = self._kept_share(module, keys, new_keys)
            return new_keys, new_values

        self.press.compress = compress  # instance attribute shadows the class method
        return self

    def __exit__(self, *exc):
        try:
            del self.press.compress
        except AttributeError:
            pass
        return False

    @torch.no_grad()
    def _kept_share(self, module, keys: torch.Tensor, new_keys: torch.Tensor) -> float | None:
        n = keys.shape[2]  # keys: (B, Hkv, n, D)
        needle = self.needle[self.needle < n]
        if needle.numel() == 0:
            return None
        h_kv = keys.shape[1]
        if new_keys.shape[2] == n:
            masked = getattr(module, "masked_key_indices", None)
            kept = torch.ones(h_kv, n, dtype=torch.bool)
            if masked is not None:
                _, head_idx, seq_idx = masked
                kept[head_idx.cpu(), seq_idx.cpu()] = False
            return kept[:, needle].float().mean().item()
        orig = keys[0].float()  # (Hkv, n, D)
        new = new_keys[0].float()  # (Hkv, k, D)
        # sanity check: kept rows must be unchanged copies of original rows
        probe_rows = new[:, :: max(1, new.shape[1] // 8)][:, :8]  # (Hkv, <=8, D)
        for h in range(h_kv):
            hits = (probe_rows[h][:, None, :] == orig[h][None]).all(-1).any(-1)
            if not bool(hits.all()):
                return None
        shares = []
        for h in range(h_kv):
            target = orig[h, needle]  # (m, D)
            present = (new[h][:, None, :] == target[None]).all(-1).any(0)  # (m,)
            shares.append(present.float().mean().item())
        return sum(shares) / len(shares)


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------

def _cache_lengths(cache) -> list[int]:
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


def _cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def _crop(cache, lengths: list[int]) -> None:
    # per layer, as kvpress's pipeline does after each answer (layers may differ for some presses)
    for layer, n in zip(cache.layers, lengths):
        layer.keys = layer.keys[:, :, :n]
        layer.values = layer.values[:, :, :n]


def _reset_masks(model) -> None:
    for module in model.modules():
        if getattr(module, "masked_key_indices", None) is not None:
            module.masked_key_indices = None


def _status_kib(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak() -> str:
    """Reset the kernel's resident high-water mark (Linux); the scope the next peak reading has."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "block"
    except OSError:
        return "process"


def _peak_memory(scope: str, rss_start) -> dict:
    """Same fields and meaning as tokensparse.eval.env.PeakMemory.stop() (this env cannot import it)."""
    peak = _status_kib("VmHWM") if scope == "block" else None
    if peak is None:
        import resource

        scope, peak = "process", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_bytes": peak * 1024, "rss_start_bytes": None if rss_start is None else rss_start * 1024,
            "scope": scope}


@torch.no_grad()
def run_one(model, tokenizer, sample: dict, press, placement: str, needs_eager: bool) -> dict:
    """Prefill (compressed), feed the question tail, greedy-decode; return the measured fields."""
    from transformers import DynamicCache

    rss_start = _status_kib("VmRSS")
    mem_scope = _reset_peak()

    context_ids = [int(t) for t in sample["context_ids"]]
    question_ids = [int(t) for t in sample["question_ids"]]
    max_new = int(sample.get("max_new_tokens", 16))
    if not question_ids:
        raise ValueError(f"sample {sample.get('sample_id')!r}: question_ids is empty")
    if placement == "after":
        prefill_ids, tail_ids = context_ids, question_ids
    elif placement == "inside":
        prefill_ids, tail_ids = context_ids + question_ids[:-1], question_ids[-1:]
    else:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")

    if needs_eager:
        model.set_attn_implementation("eager")
    try:
        cache = DynamicCache()
        probe = CompressProbe(press, sample.get("needle_positions") or []) if press is not None else None
        ctx = press(model) if press is not None else nullcontext()
        t0 = time.perf_counter()
        with ctx, (probe if probe is not None else nullcontext()):
            # no LM head during prefill, as in the pipeline
            model.model(input_ids=torch.tensor([prefill_ids]), past_key_values=cache)
        prefill_s = time.perf_counter() - t0
    finally:
        if needs_eager:
            model.set_attn_implementation("sdpa")

    kept = _cache_lengths(cache)
    kv_bytes = _cache_bytes(cache)

    # Question tail at the original absolute positions (gaps stay in RoPE after pruning).
    start = len(prefill_ids)
    pos = torch.arange(start, start + len(tail_ids)).unsqueeze(0)
    t0 = time.perf_counter()
    out = model(input_ids=torch.tensor([tail_ids]), past_key_values=cache, position_ids=pos, logits_to_keep=1)
    question_s = time.perf_counter() - t0
    first_logits = out.logits[0, -1].float()
    after_question = _cache_lengths(cache)
    next_pos = start + len(tail_ids)

    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    generated = [int(first_logits.argmax())]
    step_s = []
    for i in range(max_new - 1):
        if generated[-1] in eos:
            break
        t0 = time.perf_counter()
        out = model(
            input_ids=torch.tensor([[generated[-1]]]),
            past_key_values=cache,
            position_ids=torch.tensor([[next_pos + i]]),
        )
        step_s.append(time.perf_counter() - t0)
        generated.append(int(out.logits[0, -1].argmax()))

    # K/V held at the end of generation (prompt + generated tokens), as tokensparse's harness reports
    kv_bytes_end = _cache_bytes(cache)
    memory = _peak_memory(mem_scope, rss_start)  # the generation run only, as tokensparse's harness

    answer_loglik = None
    answer_ids = sample.get("answer_ids")
    if answer_ids:
        answer_ids = [int(t) for t in answer_ids]
        _crop(cache, after_question)
        logp = torch.log_softmax(first_logits, -1)[answer_ids[0]].item()
        if len(answer_ids) > 1:
            pos = torch.arange(next_pos, next_pos + len(answer_ids) - 1).unsqueeze(0)
            out = model(input_ids=torch.tensor([answer_ids[:-1]]), past_key_values=cache, position_ids=pos)
            lp = torch.log_softmax(out.logits[0].float(), -1)  # (len-1, V)
            logp += lp.gather(-1, torch.tensor(answer_ids[1:]).unsqueeze(-1)).sum().item()
        answer_loglik = logp

    _reset_masks(model)

    needle_per_layer = None
    if probe is None:
        needle_per_layer = [1.0] * len(kept) if sample.get("needle_positions") else None
    elif probe.per_layer and all(v is not None for v in probe.per_layer.values()):
        needle_per_layer = [probe.per_layer[i] for i in sorted(probe.per_layer)]
    vals = needle_per_layer or []
    return {
        "prediction": tokenizer.decode(generated, skip_special_tokens=True),
        "generated_ids": generated,
        "prefill_tokens": len(prefill_ids),
        "context_tokens": len(context_ids),
        "question_tokens": len(question_ids),
        "prefill_s": round(prefill_s, 4),
        "compress_s": round(probe.compress_s, 4) if probe is not None else 0.0,
        "question_s": round(question_s, 4),
        "ttft_s": round(prefill_s + question_s, 4),
        "decode_ms_per_token": round(1000 * sum(step_s) / len(step_s), 3) if step_s else None,
        "decode_steps": len(step_s),
        "kv_kept_per_layer": kept,
        "kv_bytes": kv_bytes,
        "kv_bytes_end": kv_bytes_end,
        "memory": memory,
        "answer_loglik": answer_loglik,
        "needle_kept_per_layer": [round(v, 4) for v in vals] if needle_per_layer is not None else None,
        "needle_kept_mean": round(sum(vals) / len(vals), 4) if vals else None,
        "needle_kept_min": round(min(vals), 4) if vals else None,
    }


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

PASS_THROUGH = ("task", "length", "depth", "seed", "needle_positions", "answers", "max_new_tokens")


def _env_info(threads: int) -> dict:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvpress": importlib.metadata.version("kvpress"),
        "threads": threads,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def _done_keys(out_path: Path) -> set:
    done = set()
    if not out_path.exists():
        return done
    with open(out_path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run; it will be redone
            if row.get("error"):
                continue  # failures are retried
            done.add((str(row["sample_id"]), row["press"], float(row["compression_ratio"]), row["placement"]))
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True, help="plain HF safetensors model directory")
    ap.add_argument("--tasks", required=True, help="input JSONL, one pre-tokenised sample per line")
    ap.add_argument("--out", required=True, help="output JSONL (appended; rows already there are skipped)")
    ap.add_argument("--presses", default="dense", help="comma list: dense,snapkv:0.5,streaming_llm:0.5,...")
    ap.add_argument("--placement", choices=PLACEMENTS, default="after")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        specs = parse_presses(args.presses)
    except ValueError as exc:
        ap.error(str(exc))

    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
    import kvpress  # noqa: F401  (patches attention functions for head-wise presses, as kvpress always does)

    factories = _press_factories()
    unknown = [n for n, _ in specs if n != "dense" and n not in factories]
    if unknown:
        ap.error(f"unknown press(es) {unknown}; known: dense, {', '.join(sorted(factories))}")

    with open(args.tasks) as f:
        samples = [json.loads(line) for line in f if line.strip()]
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = _done_keys(out_path)

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    print(f"[kvpress-worker] model loaded in {time.perf_counter() - t0:.1f}s; {len(samples)} samples x "
          f"{len(specs)} presses, placement={args.placement}", file=sys.stderr, flush=True)
    env = _env_info(args.threads)
    version = env["kvpress"]
    with torch.no_grad():  # untimed warm-up (allocator, kernels), as tokensparse's runner does
        ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
        warm = DynamicCache()
        model(input_ids=ids, past_key_values=warm)
        model(input_ids=ids[:, -1:], past_key_values=warm)

    total = len(samples) * len(specs)
    n = 0
    with open(out_path, "a") as out:
        for sample in samples:
            for name, ratio in specs:
                n += 1
                if name == "dense":
                    press, needs_eager = None, False
                else:
                    factory, needs_eager = factories[name]
                    press = factory(ratio)
                label = press_label(press)
                key = (str(sample["sample_id"]), label, float(ratio), args.placement)
                if key in done:
                    print(f"[kvpress-worker] {n}/{total} skip {key} (already in {out_path.name})",
                          file=sys.stderr, flush=True)
                    continue
                row = {
                    "sample_id": sample["sample_id"],
                    "peer": "kvpress",
                    "peer_version": version,
                    "press": label,
                    "press_spec": name,
                    "compression_ratio": float(ratio),
                    "placement": args.placement,
                }
                row.update({k: sample[k] for k in PASS_THROUGH if k in sample})
                try:
                    row.update(run_one(model, tokenizer, sample, press, args.placement, needs_eager))
                    row["error"] = None
                except Exception as exc:  # one failing press must not end the sweep
                    _reset_masks(model)
                    row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                row["loadavg_1m"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
                row["env"] = env
                out.write(json.dumps(row) + "\n")
                out.flush()
                if row["error"]:
                    msg = f"ERROR {row['error'][:200]}"
                else:
                    msg = (f"prefill {row['prefill_s']:.2f}s kept {row['kv_kept_per_layer'][0]} "
                           f"-> {row['prediction']!r}")
                print(f"[kvpress-worker] {n}/{total} {sample['sample_id']} {label}@{ratio} "
                      f"{args.placement}: {msg}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
