"""Train the ``tiny`` flexmoe preset on the synthetic shapes sets and write the folder it loads.

    python -m flexvlm_ray.train_tiny --out flexvlm_ray/assets/tiny [--steps N] [--seed S]

What it does:

* Tokenizer: the word-level tokenizer of the preset (``build_tokenizer``) with every token of
  ``shapes_vocabulary()`` added after the built-in words, so no word of the synthetic sets maps to
  ``[UNK]``; the vocabulary size of the preset (512) still holds them all.
* Data: a fixed pool of train-split samples, mixed by ``MIX`` (shapes_vqa 60%, shapes_caption 25%,
  shapes_count 7.5%, shapes_mc 7.5%), drawn with replacement. Each draw is preprocessed exactly as
  the adapter's ``prepare`` does (``layout_image`` + ``build_sequence``) under a ``max_crops`` that
  is 12 with probability ``FULL_CROPS_P`` and uniform in 1..12 otherwise. ``top_k`` and the decoder
  blocks always stay at the preset's full values, so reducing them at inference costs quality.
* Targets: the VQA ground-truth answer (``meta['answer']``), the count, the MC letter, or the
  caption reference ``CAPTION_REFERENCE`` (``a <bg> background with <items>``), then ``[EOS]``.
* Loss: teacher-forced cross-entropy on the target tokens only, plus ``AUX_COEF`` times OLMoE's
  router load-balancing loss over the non-padding tokens. The image features are computed by the
  model's own ``encode_crops`` / ``pool_and_project`` and spliced with ``splice_image_embeds``,
  the functions the adapter's stages call; sequences are right-padded, so with causal attention the
  real tokens never see padding and get the same positions as at inference.
* Vision side: the vision tower, pooling and projector stay frozen at their random init for the
  first ``VISION_FREEZE`` of the steps (trained from the start, their outputs collapsed to one
  vector for every token within 200 steps and the decoder learned only the question priors), then
  train at ``VISION_LR_MULT`` times the decoder's rate.
* Optimizer: AdamW (betas 0.9/0.98, weight decay 0.01), linear warm-up then cosine decay to 10% of
  the peak rate, gradient norm clipped at 1.0; float32 on the CPU.

The folder gets ``config.json``, ``tokenizer.json``, ``model.safetensors`` (float16; ``load_flexmoe``
casts to the requested dtype) and ``train.json`` (the run's settings, loss curve and wall time).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

from flexvlm_ray.data import DATASETS
from flexvlm_ray.data.base import Sample
from flexvlm_ray.data.shapes import shapes_vocabulary
from flexvlm_ray.models.flexmoe_config import EOS_ID, PAD_ID, PRESETS, FlexMoeConfig, build_tokenizer
from flexvlm_ray.models.flexmoe_model import (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, FlexMoeModel,
                                              build_flexmoe, splice_image_embeds)
from flexvlm_ray.models.flexmoe_preprocess import build_sequence, layout_image

MIX: tuple[tuple[str, float], ...] = (
    ("shapes_vqa", 0.60), ("shapes_caption", 0.25), ("shapes_count", 0.075), ("shapes_mc", 0.075))
POOL_SIZE = 6000          # train-split samples in the pool, split by MIX
FULL_CROPS_P = 0.5        # probability of training an example at max_crops = 12
CAPTION_REFERENCE = 1     # index of the caption reference used as the target
AUX_COEF = 0.01
VISION_LR_MULT = 1.0      # the vision tower, pooling and projector train at this multiple of the peak rate
VISION_FREEZE = 0.4       # share of the steps that keep the vision tower, pooling and projector at their init
TRAIN_SEED_OFFSET = 0     # the shapes train split is rendered with seed 0 (the default)


@dataclass
class Example:
    """One preprocessed training example: crops, prompt ids, image positions and target ids."""

    pixels: np.ndarray          # (num_crops, 3, crop_px, crop_px) float32
    input_ids: list[int]        # the prompt as ``prepare`` builds it
    positions: np.ndarray       # [IMG] positions in ``input_ids``
    feature_index: np.ndarray   # pooled feature per [IMG] position
    target_ids: list[int]       # answer tokens then [EOS]


def tiny_tokenizer(*, vocab_size: int) -> Tokenizer:
    """The preset tokenizer plus every token of the synthetic shapes sets."""
    return build_tokenizer(vocab_size=vocab_size, extra_words=shapes_vocabulary())


def target_text(*, sample: Sample) -> str:
    """The text the model learns to produce for a sample (see the module docstring)."""
    if sample.task == "vqa":
        return str(sample.meta["answer"])
    if sample.task == "caption":
        return sample.references[CAPTION_REFERENCE]
    return sample.references[0]


def make_example(*, sample: Sample, config: FlexMoeConfig, tokenizer: Tokenizer, max_crops: int) -> Example:
    """Preprocess a sample the way the adapter's ``prepare`` does, with its target ids."""
    layout = layout_image(image=sample.image, config=config, max_crops=max_crops)
    ids, positions = build_sequence(layout=layout, prompt=sample.prompt, tokenizer=tokenizer)
    target = tokenizer.encode(target_text(sample=sample), add_special_tokens=False).ids + [EOS_ID]
    return Example(pixels=layout.pixels, input_ids=ids, positions=positions, feature_index=layout.feature_index,
                   target_ids=target)


def build_pool(*, size: int, seed: int) -> list[tuple[str, int]]:
    """(dataset, train index) pairs split by ``MIX``; the indices depend on ``seed`` only."""
    rng = np.random.default_rng(seed)
    pool = []
    for name, share in MIX:
        count = int(round(size * share))
        pool += [(name, int(i)) for i in rng.choice(20000, size=count, replace=False)]
    return pool


def draw_max_crops(*, rng: np.random.Generator, limit: int) -> int:
    """``limit`` with probability ``FULL_CROPS_P``, else uniform in 1..limit."""
    return limit if rng.random() < FULL_CROPS_P else int(rng.integers(1, limit + 1))


def batch_loss(*, model: FlexMoeModel, examples: Sequence[Example],
               aux_coef: float = AUX_COEF) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total loss, target cross-entropy, router load-balancing loss) of a batch, teacher forced.

    Row ``r`` holds the prompt and every target token but the last; the hidden state at prompt
    position ``len(prompt) - 1 + j`` predicts target token ``j``.
    """
    device = next(model.parameters()).device
    pixels = torch.from_numpy(np.concatenate([e.pixels for e in examples])).to(device)
    embeds = model.pool_and_project(model.encode_crops(pixels))
    per_crop = model.config.tokens_per_crop
    rows = [e.input_ids + e.target_ids[:-1] for e in examples]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    labels = torch.full((len(rows), length), -100, dtype=torch.long, device=device)
    for r, (row, e) in enumerate(zip(rows, examples)):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
        start = len(e.input_ids) - 1
        labels[r, start:start + len(e.target_ids)] = torch.tensor(e.target_ids)
    decoder = model.decoder.model
    hidden = decoder.embed_tokens(ids)
    offset = 0
    for r, e in enumerate(examples):
        crops = e.pixels.shape[0]
        splice_image_embeds(hidden=hidden, row=r, embeds=embeds[offset:offset + crops * per_crop],
                            positions=torch.from_numpy(e.positions).to(device),
                            feature_index=torch.from_numpy(e.feature_index).to(device))
        offset += crops * per_crop
    out = decoder(inputs_embeds=hidden, attention_mask=mask, output_router_logits=True)
    chosen = labels != -100
    logits = model.decoder.lm_head(out.last_hidden_state[chosen])
    ce = F.cross_entropy(logits.float(), labels[chosen])
    aux = load_balancing_loss_func(out.router_logits, model.config.num_experts, model.config.top_k, mask)
    aux = torch.as_tensor(aux, dtype=ce.dtype, device=device)
    return ce + aux_coef * aux, ce, aux


def learning_rate(*, step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``0.1 * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def save_trained(*, model: FlexMoeModel, tokenizer: Tokenizer, directory: Path, report: dict[str, Any]) -> Path:
    """Write config, tokenizer, float16 weights and ``train.json``; ``load_flexmoe`` reads the folder."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(model.config.to_json())
    tokenizer.save(str(directory / TOKENIZER_FILE))
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / "train.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    return directory


def train(*, out: Path, steps: int, seed: int, batch_size: int = 8, peak_lr: float = 2e-3,
          config: Optional[FlexMoeConfig] = None, pool_size: int = POOL_SIZE, threads: int = 1,
          log_every: int = 25, vision_lr_mult: float = VISION_LR_MULT,
          checkpoint_every: int = 0, checkpoint_dir: Optional[Path] = None,
          vision_freeze: float = VISION_FREEZE) -> dict[str, Any]:
    """Train from the seed's random weights, save to ``out``; the training report."""
    torch.set_num_threads(threads)
    config = config or PRESETS["tiny"]
    tokenizer = tiny_tokenizer(vocab_size=config.vocab_size)
    model = build_flexmoe(config, device="cpu", dtype=torch.float32, seed=seed)
    model.train()
    loaders = {name: DATASETS.get(name).load(split="train") for name, _ in MIX}
    pool = build_pool(size=pool_size, seed=seed)
    rng = np.random.default_rng(seed + 1)
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        image_side = not name.startswith("decoder.")          # vision tower, pooling, projector
        decayed = param.ndim >= 2 and "norm" not in name
        groups.setdefault((image_side, decayed), []).append(param)
    optimizer = torch.optim.AdamW([{"params": params, "weight_decay": 0.01 if decayed else 0.0,
                                    "lr_mult": vision_lr_mult if image_side else 1.0}
                                   for (image_side, decayed), params in groups.items()],
                                  lr=peak_lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    image_params = [p for n, p in model.named_parameters() if not n.startswith("decoder.")]
    freeze_steps = int(round(vision_freeze * steps))
    for param in image_params:
        param.requires_grad_(freeze_steps == 0)
    history: list[dict[str, float]] = []
    running: list[tuple[float, float]] = []
    begin = time.perf_counter()
    def next_batch() -> list[Example]:
        picks = [(pool[int(i)], draw_max_crops(rng=rng, limit=config.max_crops))
                 for i in rng.integers(len(pool), size=batch_size)]
        return [make_example(sample=loaders[name][index], config=config, tokenizer=tokenizer, max_crops=crops)
                for (name, index), crops in picks]

    prefetch = ThreadPoolExecutor(max_workers=1)   # preprocesses batch n+1 while batch n trains
    pending = prefetch.submit(next_batch)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = group["lr_mult"] * learning_rate(step=step, steps=steps, peak=peak_lr, warmup=warmup)
        if step == freeze_steps and freeze_steps:
            for param in image_params:
                param.requires_grad_(True)
        examples = pending.result()
        if step + 1 < steps:
            pending = prefetch.submit(next_batch)
        loss, ce, aux = batch_loss(model=model, examples=examples)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running.append((ce.item(), aux.item()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            ce_mean = float(np.mean([c for c, _ in running]))
            aux_mean = float(np.mean([a for _, a in running]))
            elapsed = time.perf_counter() - begin
            history.append({"step": step + 1, "ce": round(ce_mean, 4), "aux": round(aux_mean, 4),
                            "seconds": round(elapsed, 1)})
            print(f"step {step + 1}/{steps} ce {ce_mean:.4f} aux {aux_mean:.4f} "
                  f"lr {learning_rate(step=step, steps=steps, peak=peak_lr, warmup=warmup):.2e} {elapsed:.0f}s", flush=True)
            running.clear()
        if checkpoint_dir is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save_trained(model=model, tokenizer=tokenizer, directory=Path(checkpoint_dir),
                         report={"steps_done": step + 1, "history": history})
    prefetch.shutdown()
    wall = time.perf_counter() - begin
    report = {"steps": steps, "seed": seed, "batch_size": batch_size, "peak_lr": peak_lr, "vision_lr_mult": vision_lr_mult,
              "vision_freeze_steps": freeze_steps,
              "warmup_steps": warmup,
              "schedule": "linear warm-up, cosine to 0.1 x peak", "optimizer": "AdamW(0.9, 0.98), wd 0.01, clip 1.0",
              "aux_coef": AUX_COEF, "mix": dict(MIX), "pool_size": pool_size, "full_crops_p": FULL_CROPS_P,
              "caption_reference": CAPTION_REFERENCE, "threads": threads, "wall_seconds": round(wall, 1),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", torch {torch.__version__}",
              "history": history}
    model.eval()
    save_trained(model=model, tokenizer=tokenizer, directory=Path(out), report=report)
    return report


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Train the tiny flexmoe model on the synthetic shapes sets.")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (e.g. flexvlm_ray/assets/tiny)")
    parser.add_argument("--steps", type=int, default=1100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vision-lr-mult", type=float, default=VISION_LR_MULT,
                        help="learning-rate multiple for the vision tower, pooling and projector")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 ran 3-7x faster than 2 on a busy 2-core machine)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--vision-freeze", type=float, default=VISION_FREEZE,
                        help="share of the steps that keep the vision tower, pooling and projector frozen")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="save to --checkpoint-dir every N steps")
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    report = train(out=args.out, steps=args.steps, seed=args.seed, batch_size=args.batch_size, peak_lr=args.lr,
                   threads=args.threads, log_every=args.log_every, vision_lr_mult=args.vision_lr_mult,
                   checkpoint_every=args.checkpoint_every, checkpoint_dir=args.checkpoint_dir, vision_freeze=args.vision_freeze)
    print(f"trained {report['steps']} steps in {report['wall_seconds']:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
