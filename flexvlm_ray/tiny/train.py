"""Train the ``tiny`` flexmoe preset on the synthetic shapes sets and write the folder it loads.

    flexvlm-ray train-tiny --out flexvlm_ray/assets/tiny [--steps N] [--seed S]

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
* Patch embedding: fixed low-frequency cosine filters (``dct_patch_embedding``), never trained.
  Trained with Adam, the 42-px filters (5292 inputs each) collapsed the image tokens to one vector
  within tens of steps, even at a learning rate of 3e-4 (the likely cause of the collapse in runs 2-3
  of docs/TINY_MODEL.md).
* Phase 1 (``PRETRAIN_STEPS``, batches of 16 images): only the vision tower, pooling and projector
  train, on ``AttributeHead``: every pooled image token predicts which shape attributes it covers
  (any shape, each colour, each kind, small; from ``sample_scene`` and the crop geometry) and the
  background colour. The decoder is untouched.
* Phase 2 (``--steps``): the decoder trains on the task targets; the image side stays frozen
  (``VISION_FREEZE`` = 1.0). ``GroundingHead`` adds a loss after ``GROUND_LAYER`` block(s) at every
  colour or kind word of the prompt: does the image show such a shape? That question is one
  attention hop from the word's own position; without it the decoder only ever learned the question
  priors. Curriculum (``EARLY_CROPS``): for the first 40% of phase 2 every draw is rendered at
  max_crops 1 and its prompt replaced by an answer-balanced colour probe (``probe_sample``:
  ``is there a red shape?``, half yes, half no), so no question prior helps; afterwards
  ``PROBES[1]`` of the draws get a probe (colour, kind or both) and the rest are the sets' own
  prompts at the full crop distribution.
* Optimizer: AdamW (betas 0.9/0.98, weight decay 0.01), linear warm-up then cosine decay to 10% of
  the peak rate, gradient norm clipped at 1.0; float32 on the CPU. The read-out heads are training
  only and are not saved.
* ``--diag-every``: teacher-forced cross-entropy and first-token accuracy on shapes_vqa validation
  0..63 with each sample's own image and with the next sample's image (``image_reliance``).

The folder gets ``config.json``, ``tokenizer.json``, ``model.safetensors`` (float16; ``load_flexmoe``
casts to the requested dtype) and ``train.json`` (the run's settings, loss curve and wall time).
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

from flexvlm_ray.knobs.moe import temporary_top_k
from flexvlm_ray.models.flexmoe.config import PAD_ID, PRESETS, FlexMoeConfig
from flexvlm_ray.models.flexmoe.model import (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, FlexMoeModel,
                                              build_flexmoe, load_flexmoe, splice_image_embeds)
from flexvlm_ray.tiny.examples import (CAPTION_REFERENCE, FULL_CROPS_P, MIX, POOL_SIZE, Draw, Example, build_pool,
                                       draw_max_crops, example_loader, reliance_examples, stack_pixels,
                                       tiny_tokenizer)
from flexvlm_ray.tiny.heads import AttributeHead, GroundingHead, SummaryHead, dct_patch_embedding

AUX_COEF = 0.01
VISION_LR_MULT = 0.5      # the vision tower, pooling and projector train at this multiple of the peak rate
VISION_FREEZE = 1.0       # share of the steps that keep the vision tower, pooling and projector at their init
PROBES = (1.0, 0.25)      # share of phase-2 draws whose prompt becomes an existence probe (early, later)
GROUND_COEF = 1.0         # weight of the word-grounding loss (GroundingHead) during phase 2
GROUND_EXTRA = False      # grounding also reads out count, shared colour and shared kind (else shown only)
GROUND_ANSWERS = False    # grounding targets at the target words too (captions, answers), not only the prompt
GROUND_LAYER = 1          # the grounding read-out is after this many decoder blocks
SUMMARY_COEF = 0.0        # weight of the decoder's image-summary loss (SummaryHead) during phase 2
SUMMARY_LAYER = 2         # the summary is read after this many decoder blocks
EARLY_CROPS = (0.4, 1)    # curriculum: for this share of phase 2, max_crops is uniform in 1..N (fewer image
                          # tokens) and every prompt is a colour probe (probe_sample)
ATTR_COEF = 0.5           # weight of the image tokens' attribute loss during phase 2
PRETRAIN_STEPS = 600      # phase 1: attribute read-out only (vision tower, pooling, projector)



def batch_loss(*, model: FlexMoeModel, examples: Sequence[Example], aux_coef: float = AUX_COEF,
               head: Optional[AttributeHead] = None, attr_coef: float = 0.0,
               summary_head: Optional[SummaryHead] = None, summary_coef: float = 0.0, summary_layer: int = 2,
               ground_head: Optional[GroundingHead] = None, ground_coef: float = 0.0, ground_layer: int = 1,
               extras: Optional[dict[str, Any]] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total loss, target cross-entropy, router load-balancing loss) of a batch, teacher forced.

    Row ``r`` holds the prompt and every target token but the last; the hidden state at prompt
    position ``len(prompt) - 1 + j`` predicts target token ``j``. With ``head`` and ``attr_coef``
    the attribute loss of the image tokens is added to the total (``extras['attr']``,
    ``extras['attr_acc']``); with ``summary_head`` and ``summary_coef`` the summary loss at the last
    prompt position after ``summary_layer`` blocks (``extras['summary']``); ``extras['logits']`` gets
    the target logits.
    """
    device = next(model.parameters()).device
    pixels = stack_pixels(examples=examples, device=device)
    embeds = model.pool_and_project(model.encode_crops(pixels))
    attr = None
    if head is not None and attr_coef:
        attr, attr_acc = head.loss(embeds=embeds, examples=examples)
        if extras is not None:
            extras.update(attr=attr.item(), attr_acc=attr_acc.item())
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
    use_summary = summary_head is not None and summary_coef > 0
    use_ground = ground_head is not None and ground_coef > 0
    out = decoder(inputs_embeds=hidden, attention_mask=mask, output_router_logits=True,
                  output_hidden_states=use_summary or use_ground)
    ground = None
    if use_ground:
        result = ground_head.loss(hidden_states=out.hidden_states[ground_layer], examples=examples)
        if result is not None:
            ground = result[0]
            if extras is not None:
                extras.update(ground=result[0].item(), ground_acc=result[1].item())
    summary = None
    if use_summary:
        last = torch.tensor([len(e.input_ids) - 1 for e in examples], device=device)
        states = out.hidden_states[summary_layer][torch.arange(len(examples), device=device), last]
        summary, summary_acc = summary_head.loss(states=states, examples=examples)
        if extras is not None:
            extras.update(summary=summary.item(), summary_acc=summary_acc.item())
    chosen = labels != -100
    logits = model.decoder.lm_head(out.last_hidden_state[chosen])
    ce = F.cross_entropy(logits.float(), labels[chosen])
    aux = load_balancing_loss_func(out.router_logits, model.config.num_experts, model.config.top_k, mask)
    aux = torch.as_tensor(aux, dtype=ce.dtype, device=device)
    if extras is not None:
        extras.update(logits=logits.detach(), labels=labels[chosen])
    total = ce + aux_coef * aux
    if attr is not None:
        total = total + attr_coef * attr
    if summary is not None:
        total = total + summary_coef * summary
    if ground is not None:
        total = total + ground_coef * ground
    return total, ce, aux


@contextmanager
def reduced_config(*, model: FlexMoeModel, blocks: int, top_k: int) -> Iterator[None]:
    """Inside, the decoder runs its first ``blocks`` blocks (the prefix mask) with ``top_k`` experts per token:
    a training step of a reduced configuration (``train(elastic=)``). The blocks and every router's top_k are
    restored afterwards, also when the step raises."""
    decoder = model.decoder.model
    layers, count = decoder.layers, decoder.config.num_hidden_layers
    if not 1 <= blocks <= len(layers) or not 1 <= top_k <= model.config.num_experts:
        raise ValueError(f"a reduced configuration needs 1 <= blocks <= {len(layers)} and "
                         f"1 <= top_k <= {model.config.num_experts}, got blocks {blocks}, top_k {top_k}")
    # OLMoE's forward runs layers[:config.num_hidden_layers]; the module list stays whole, so the output
    # hooks transformers installs on the first forward (router logits) cover every block
    decoder.config.num_hidden_layers = blocks
    try:
        with temporary_top_k(routers=[layer.mlp.gate for layer in layers], top_k=top_k):
            yield
    finally:
        decoder.config.num_hidden_layers = count


def draw_reduced(*, rng: np.random.Generator, elastic: float, config: FlexMoeConfig) -> Optional[tuple[int, int]]:
    """With probability ``elastic``: (blocks, top_k) uniform over 1..num_blocks x 1..top_k (the preset's
    default top_k; fewer experts is the knob's direction), else None (the full configuration)."""
    if elastic <= 0 or rng.random() >= elastic:
        return None
    return int(rng.integers(1, config.num_blocks + 1)), int(rng.integers(1, config.top_k + 1))


def image_reliance(*, model: FlexMoeModel, own: Sequence[Example], shuffled: Sequence[Example]) -> dict[str, float]:
    """Teacher-forced target cross-entropy and first-target-token accuracy with each sample's own
    image and with another sample's image; a model that reads the image does better with its own."""
    out = {}
    with torch.no_grad():
        for name, examples in (("own", own), ("shuffled", shuffled)):
            ces, hits = [], []
            for start in range(0, len(examples), 16):
                chunk = examples[start:start + 16]
                extras: dict[str, Any] = {}
                _, ce, _ = batch_loss(model=model, examples=chunk, extras=extras)
                ces.append(ce.item() * len(chunk))
                firsts = np.cumsum([0] + [len(e.target_ids) for e in chunk])[:-1]
                pred = extras["logits"].argmax(-1)[firsts]
                hits += (pred == extras["labels"][firsts]).tolist()
            out[f"ce_{name}"] = round(sum(ces) / len(examples), 4)
            out[f"first_acc_{name}"] = round(float(np.mean(hits)), 4)
    return out



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


def load_phase1_cache(path: Path, *, device: Any) -> dict[str, Any]:
    """The phase-1 cache, loaded with ``weights_only`` (it holds tensors, dicts, lists and numbers
    only, so no pickled code can run); {} when the file is not such a cache."""
    try:
        cached = torch.load(path, weights_only=True, map_location=device)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        print(f"phase 1 cache {path} not loadable ({(str(exc).splitlines() or [''])[0][:120]}); "
              f"training phase 1", flush=True)
        return {}
    return cached if isinstance(cached, dict) else {}


def train(*, out: Path, steps: int, seed: int, batch_size: int = 8, peak_lr: float = 2e-3,
          config: Optional[FlexMoeConfig] = None, pool_size: int = POOL_SIZE, threads: int = 1,
          log_every: int = 25, vision_lr_mult: float = VISION_LR_MULT,
          checkpoint_every: int = 0, checkpoint_dir: Optional[Path] = None,
          vision_freeze: float = VISION_FREEZE, attr_coef: float = ATTR_COEF,
          pretrain_steps: int = PRETRAIN_STEPS, pretrain_batch: int = 16,
          diag_every: int = 0, diag_count: int = 64, summary_coef: float = SUMMARY_COEF,
          summary_layer: int = SUMMARY_LAYER, early_crops: tuple[float, int] = EARLY_CROPS,
          phase1_cache: Optional[Path] = None, ground_coef: float = GROUND_COEF,
          ground_layer: int = GROUND_LAYER, probes: tuple[float, float] = PROBES,
          init_from: Optional[Path] = None, ground_extra: bool = GROUND_EXTRA,
          ground_answers: bool = GROUND_ANSWERS, device: str = "cpu", workers: int = 1,
          elastic: float = 0.0) -> dict[str, Any]:
    """Train from the seed's random weights, save to ``out``; the training report.

    Phase 1 (``pretrain_steps``): the vision tower, pooling and projector learn the attribute
    read-out alone (``AttributeHead``; batches of ``pretrain_batch`` images), so the image tokens
    carry the shapes before the decoder sees them. Phase 2 (``steps``): the decoder's target
    cross-entropy, plus ``attr_coef`` times the attribute loss, which keeps the image tokens
    informative while the vision side trains.

    ``device``: where the model trains (on CUDA with TF32 matmuls); ``workers``: processes that build
    the examples ahead of the step (the draws themselves come from one stream, so they do not change).

    ``elastic``: the share of phase-2 steps after the curriculum that train a reduced configuration
    (``draw_reduced``: a prefix of 1..num_blocks blocks and 1..top_k experts, ``reduced_config``), so that the
    knobs cost less quality at inference; the summary and grounding losses are left out of a step whose
    blocks do not reach their layer. Its draws come from their own stream (seed + 2): ``elastic`` 0 trains
    exactly as before.
    """
    if not 0.0 <= elastic <= 1.0:
        raise ValueError(f"elastic is the share of steps that train a reduced configuration: 0..1, got {elastic}")
    torch.set_num_threads(threads)
    device = torch.device(device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    config = config or PRESETS["tiny"]
    tokenizer = tiny_tokenizer(vocab_size=config.vocab_size)
    model = build_flexmoe(config, device="cpu", dtype=torch.float32, seed=seed).to(device)
    head = AttributeHead(config.hidden_size).to(device)
    summary_head = SummaryHead(config.hidden_size).to(device)
    ground_head = GroundingHead(config.hidden_size, extra=ground_extra).to(device)
    patch_embedding = model.vision.embeddings.patch_embedding
    with torch.no_grad():
        patch_embedding.weight.copy_(dct_patch_embedding(out_channels=config.vit_hidden, patch=config.vit_patch_px))
    model.train()
    pool = build_pool(size=pool_size, seed=seed)
    rng = np.random.default_rng(seed + 1)
    if init_from is not None:                          # continue from a trained folder (phase 1 skipped)
        trained, _ = load_flexmoe(init_from, device="cpu", dtype=torch.float32)
        model.load_state_dict(trained.state_dict())
        pretrain_steps = 0
    patch_embedding.weight.requires_grad_(False)      # fixed cosine filters (see dct_patch_embedding)
    image_params = [p for n, p in model.named_parameters() if not n.startswith("decoder.") and p.requires_grad]
    history: list[dict[str, float]] = []
    diagnostics: list[dict[str, float]] = []
    begin = time.perf_counter()
    if diag_every:
        own, shuffled = reliance_examples(config=config, tokenizer=tokenizer, count=diag_count)

    def draw_batches(count: int, size: int, *, early: int = 0, probe_p: float = 0.0) -> list[list[Draw]]:
        """``count`` batches of draws, drawn here in order (the same stream for any ``workers``). The first
        ``early`` batches follow the curriculum (``EARLY_CROPS``: max_crops uniform in 1..N, every prompt a
        colour probe); the rest take ``draw_max_crops`` and a probe with probability ``probe_p``."""
        batches = []
        for b in range(count):
            curriculum = b < early
            batches.append([Draw(name=pool[int(i)][0], index=pool[int(i)][1],
                                 max_crops=int(rng.integers(1, early_crops[1] + 1)) if curriculum
                                 else draw_max_crops(rng=rng, limit=config.max_crops),
                                 probe_seed=int(rng.integers(2**62))
                                 if rng.random() < (probes[0] if curriculum else probe_p) else None,
                                 forms=(0,) if curriculum else (0, 1, 2))
                            for i in rng.integers(len(pool), size=size)])
        return batches

    def batches(draws: list[list[Draw]]) -> Iterator[list[Example]]:
        return iter(example_loader(draws=draws, config=config, ground_answers=ground_answers, workers=workers,
                                   pin_memory=device.type == "cuda"))

    # phase 1: the image side learns the attribute read-out
    phase1_key = {"seed": seed, "pretrain_steps": pretrain_steps, "pretrain_batch": pretrain_batch,
                  "peak_lr": peak_lr, "pool_size": pool_size, "config": config.to_dict()}
    phase1_loaded = _load_phase1(cache=phase1_cache, key=phase1_key, model=model, head=head, history=history,
                                 rng=rng, device=device)
    if pretrain_steps and not phase1_loaded:
        _pretrain_image_side(model=model, head=head, params=image_params, steps=pretrain_steps, peak_lr=peak_lr,
                             loader=batches(draw_batches(pretrain_steps, pretrain_batch)), device=device,
                             log_every=log_every, history=history, begin=begin)
        if phase1_cache is not None:
            torch.save({"key": phase1_key, "model": model.state_dict(), "head": head.state_dict(),
                        "history": history, "rng": rng.bit_generator.state}, phase1_cache)

    # phase 2: the whole model on the task targets
    param_groups = _task_param_groups(model=model, image_heads=[head], decoder_heads=[summary_head, ground_head],
                                      vision_lr_mult=vision_lr_mult)
    early_steps = int(round(early_crops[0] * steps))
    optimizer = torch.optim.AdamW(param_groups, lr=peak_lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    freeze_steps = int(round(vision_freeze * steps))
    for param in image_params:
        param.requires_grad_(freeze_steps == 0)
    running: list[tuple[float, float, float]] = []
    elastic_rng = np.random.default_rng(seed + 2)
    reduced_steps = 0
    loader = batches(draw_batches(steps, batch_size, early=early_steps, probe_p=probes[1]))
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = group["lr_mult"] * learning_rate(step=step, steps=steps, peak=peak_lr, warmup=warmup)
        if step == freeze_steps and freeze_steps:
            for param in image_params:
                param.requires_grad_(True)
        examples = next(loader)
        extras: dict[str, Any] = {}
        reduced = draw_reduced(rng=elastic_rng, elastic=elastic, config=config) if step >= early_steps else None
        blocks, top_k = reduced or (config.num_blocks, config.top_k)
        reduced_steps += reduced is not None
        with reduced_config(model=model, blocks=blocks, top_k=top_k):
            loss, ce, aux = batch_loss(model=model, examples=examples, head=head,
                                       attr_coef=attr_coef if step >= freeze_steps else 0.0,
                                       summary_head=summary_head,
                                       summary_coef=summary_coef if blocks >= summary_layer else 0.0,
                                       summary_layer=summary_layer, ground_head=ground_head,
                                       ground_coef=ground_coef if blocks >= ground_layer else 0.0,
                                       ground_layer=ground_layer, extras=extras)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running.append((ce.item(), aux.item(), extras.get("attr", float("nan")), extras.get("summary", float("nan")),
                        extras.get("ground", float("nan")), extras.get("ground_acc", float("nan"))))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            ce_mean, aux_mean, attr_mean, sum_mean, ground_mean, ground_acc = (float(np.nanmean(col)) if not
                                                                              np.all(np.isnan(col)) else float("nan")
                                                                              for col in zip(*running))
            elapsed = time.perf_counter() - begin
            history.append({"step": step + 1, "ce": round(ce_mean, 4), "aux": round(aux_mean, 4),
                            "attr": round(attr_mean, 4), "summary": round(sum_mean, 4),
                            "ground": round(ground_mean, 4), "ground_acc": round(ground_acc, 4),
                            "seconds": round(elapsed, 1)})
            print(f"step {step + 1}/{steps} ce {ce_mean:.4f} aux {aux_mean:.4f} attr {attr_mean:.4f} "
                  f"summary {sum_mean:.4f} ground {ground_mean:.4f} acc {ground_acc:.3f} "
                  f"lr {learning_rate(step=step, steps=steps, peak=peak_lr, warmup=warmup):.2e} {elapsed:.0f}s", flush=True)
            running.clear()
        if diag_every and ((step + 1) % diag_every == 0 or step + 1 == steps):
            diag = {"step": step + 1, **image_reliance(model=model, own=own, shuffled=shuffled)}
            diagnostics.append(diag)
            print("reliance", diag, flush=True)
        if checkpoint_dir is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save_trained(model=model, tokenizer=tokenizer, directory=Path(checkpoint_dir),
                         report={"steps_done": step + 1, "history": history})
    del loader
    wall = time.perf_counter() - begin
    report = {"steps": steps, "seed": seed, "batch_size": batch_size, "peak_lr": peak_lr, "vision_lr_mult": vision_lr_mult,
              "vision_freeze_steps": freeze_steps, "pretrain_steps": pretrain_steps, "pretrain_batch": pretrain_batch,
              "attr_coef": attr_coef, "summary_coef": summary_coef, "summary_layer": summary_layer,
              "ground_coef": ground_coef, "ground_layer": ground_layer, "ground_extra": ground_extra,
              "ground_answers": ground_answers, "probes": list(probes),
              "early_crops": list(early_crops), "init_from": None if init_from is None else str(init_from),
              "phase1_loaded_from_cache": phase1_loaded, "warmup_steps": warmup,
              "pool_size": pool_size, "threads": threads, "workers": workers, "wall_seconds": round(wall, 1),
              "elastic": elastic, "reduced_steps": reduced_steps,
              **_fixed_settings(device=device), "history": history, "image_reliance": diagnostics}
    model.eval()
    save_trained(model=model, tokenizer=tokenizer, directory=Path(out), report=report)
    return report



def _load_phase1(*, cache: Optional[Path], key: dict[str, Any], model: FlexMoeModel, head: AttributeHead,
                 history: list[dict[str, float]], rng: np.random.Generator, device: torch.device) -> bool:
    """Restore model, head, history and draw stream after phase 1 from ``cache`` when it was written by a
    run of the same seed and settings (``key``); False when there is none to use. The file holds tensors
    and plain data only, so it loads with ``weights_only=True``."""
    if cache is None or not Path(cache).is_file():
        return False
    cached = load_phase1_cache(Path(cache), device=device)
    if cached.get("key") != key:
        return False
    model.load_state_dict(cached["model"])
    head.load_state_dict(cached["head"])
    history += cached["history"]
    rng.bit_generator.state = cached["rng"]
    print(f"phase 1 loaded from {cache}", flush=True)
    return True


def _pretrain_image_side(*, model: FlexMoeModel, head: AttributeHead, params: list[torch.nn.Parameter], steps: int,
                         peak_lr: float, loader: Iterator[list[Example]], device: torch.device, log_every: int,
                         history: list[dict[str, float]], begin: float) -> None:
    """Phase 1: the vision tower, pooling and projector (``params``) learn the attribute read-out alone."""
    optimizer = torch.optim.AdamW([{"params": params + list(head.parameters())}], lr=peak_lr,
                                  betas=(0.9, 0.98), weight_decay=0.0)
    running_attr: list[tuple[float, float]] = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step=step, steps=steps, peak=peak_lr, warmup=max(1, steps // 20))
        examples = next(loader)
        pixels = stack_pixels(examples=examples, device=device)
        loss, acc = head.loss(embeds=model.pool_and_project(model.encode_crops(pixels)), examples=examples)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + list(head.parameters()), 1.0)
        optimizer.step()
        running_attr.append((loss.item(), acc.item()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - begin
            attr, acc = np.mean(running_attr, axis=0)
            history.append({"pretrain_step": step + 1, "attr": round(float(attr), 4),
                            "attr_acc": round(float(acc), 4), "seconds": round(elapsed, 1)})
            print(f"pretrain {step + 1}/{steps} attr {attr:.4f} acc {acc:.3f} {elapsed:.0f}s", flush=True)
            running_attr.clear()


def _task_param_groups(*, model: FlexMoeModel, image_heads: Sequence[torch.nn.Module],
                       decoder_heads: Sequence[torch.nn.Module], vision_lr_mult: float) -> list[dict[str, Any]]:
    """Phase 2's AdamW groups: image side vs decoder (the image side at ``vision_lr_mult`` of the rate),
    decayed (matrices) vs not (norms, biases); the read-out heads undecayed."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        image_side = not name.startswith("decoder.")          # vision tower, pooling, projector
        decayed = param.ndim >= 2 and "norm" not in name
        groups.setdefault((image_side, decayed), []).append(param)
    param_groups = [{"params": params, "weight_decay": 0.01 if decayed else 0.0,
                     "lr_mult": vision_lr_mult if image_side else 1.0}
                    for (image_side, decayed), params in groups.items()]
    param_groups.append({"params": [p for h in image_heads for p in h.parameters()], "weight_decay": 0.0,
                         "lr_mult": vision_lr_mult})
    param_groups.append({"params": [p for h in decoder_heads for p in h.parameters()], "weight_decay": 0.0,
                         "lr_mult": 1.0})
    return param_groups


def _fixed_settings(*, device: torch.device) -> dict[str, Any]:
    """The report's settings that no argument of ``train`` changes, and the machine."""
    return {"schedule": "linear warm-up, cosine to 0.1 x peak", "optimizer": "AdamW(0.9, 0.98), wd 0.01, clip 1.0",
            "aux_coef": AUX_COEF, "mix": dict(MIX), "full_crops_p": FULL_CROPS_P,
            "caption_reference": CAPTION_REFERENCE,
            "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)}, TF32)",
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", torch {torch.__version__}"}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="flexvlm-ray train-tiny", description="Train the tiny flexmoe model on the synthetic shapes sets.")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (e.g. flexvlm_ray/assets/tiny)")
    parser.add_argument("--steps", type=int, default=2200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vision-lr-mult", type=float, default=VISION_LR_MULT,
                        help="learning-rate multiple for the vision tower, pooling and projector")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 ran 3-7x faster than 2 on a busy 2-core machine)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes that build the examples ahead of the training step (0: none)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--vision-freeze", type=float, default=VISION_FREEZE,
                        help="share of the steps that keep the vision tower, pooling and projector frozen")
    parser.add_argument("--attr-coef", type=float, default=ATTR_COEF)
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    parser.add_argument("--pretrain-batch", type=int, default=16)
    parser.add_argument("--diag-every", type=int, default=100, help="own- vs shuffled-image diagnostics every N steps")
    parser.add_argument("--ground-coef", type=float, default=GROUND_COEF)
    parser.add_argument("--ground-layer", type=int, default=GROUND_LAYER)
    parser.add_argument("--ground-extra", type=int, choices=(0, 1), default=int(GROUND_EXTRA))
    parser.add_argument("--ground-answers", type=int, choices=(0, 1), default=int(GROUND_ANSWERS))
    parser.add_argument("--init-from", type=Path, default=None, help="trained folder to continue from (no phase 1)")
    parser.add_argument("--probes-later", type=float, default=PROBES[1])
    parser.add_argument("--summary-coef", type=float, default=SUMMARY_COEF)
    parser.add_argument("--summary-layer", type=int, default=SUMMARY_LAYER)
    parser.add_argument("--early-crops-share", type=float, default=EARLY_CROPS[0])
    parser.add_argument("--phase1-cache", type=Path, default=None,
                        help="file holding the model after phase 1 (loaded when it matches, else written)")
    parser.add_argument("--pool-size", type=int, default=POOL_SIZE)
    parser.add_argument("--checkpoint-every", type=int, default=0, help="save to --checkpoint-dir every N steps")
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    parser.add_argument("--elastic", type=float, default=0.0,
                        help="share of phase-2 steps (after the curriculum) that train a reduced configuration: "
                             "a prefix of 1..N blocks and 1..top_k experts (0: full configuration only)")
    args = parser.parse_args(argv)
    report = train(out=args.out, steps=args.steps, seed=args.seed, batch_size=args.batch_size, peak_lr=args.lr,
                   threads=args.threads, log_every=args.log_every, vision_lr_mult=args.vision_lr_mult,
                   checkpoint_every=args.checkpoint_every, checkpoint_dir=args.checkpoint_dir, vision_freeze=args.vision_freeze,
                   attr_coef=args.attr_coef, pretrain_steps=args.pretrain_steps, pretrain_batch=args.pretrain_batch,
                   diag_every=args.diag_every, pool_size=args.pool_size, summary_coef=args.summary_coef,
                   summary_layer=args.summary_layer, ground_coef=args.ground_coef, ground_layer=args.ground_layer,
                   phase1_cache=args.phase1_cache, init_from=args.init_from, ground_extra=bool(args.ground_extra),
                   ground_answers=bool(args.ground_answers), device=args.device, workers=args.workers, probes=(PROBES[0], args.probes_later), early_crops=(args.early_crops_share, EARLY_CROPS[1]),
                   elastic=args.elastic)
    print(f"trained {report['steps']} steps in {report['wall_seconds']:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
