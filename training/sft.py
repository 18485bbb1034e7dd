"""The training loop of one worker: TRL's SFT trainer with a PEFT LoRA adapter.

Examples are tokenized with the serving path's own prompt encoding, so the model is
trained on exactly the token sequence it is scored on; the loss covers the assistant
answer only (the label word and the end-of-turn token). Levers that keep CPU training fast
without changing what is learned:

- left padding, so every answer sits in the last K positions and the LM head runs on
  those K positions only (the vocabulary projection over every position costs several
  times the rest of this small model);
- no gradient checkpointing (TRL turns it on by default; it costs an extra forward);
- bfloat16 base weights where the hardware multiplies them natively (`dtype: auto`), with
  float32 LoRA weights and a float32 output head, as serving runs them;
- optionally LoRA on the upper layers only (`lora.top_layers`): no backward below them,
  and (`cache_frozen_layers`) the frozen layers run once per example, not once per step
  (`phishgate.training.frozen`);
- length-grouped batches.

`train_loop` reports before training (the base model's dev metrics, epoch 0) and after
every epoch (dev metrics + the adapter folder, with its history) to a `Reporter`: Ray
Train's (`train_worker`, what `phishgate train` runs) or an in-process one (`--no-ray`).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from phishgate.core.settings import CoreSettings
from phishgate.core.tasks import get_task
from phishgate.training.config import TrainConfig
from phishgate.training.evaluate import Example, load_examples, sample

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from phishgate.training.frozen import FrozenLowerLayers

IGNORE_INDEX = -100
HISTORY = "history.json"
DEV_SCORES = "dev_scores.json"  # next to HISTORY in a checkpoint: the epoch's dev scores


@dataclass(frozen=True)
class EpochRecord:
    """Dev metrics at one point of training (epoch 0: the base model before training)."""

    epoch: int
    metrics: dict[str, float]
    threshold: float
    train_seconds: float


def featurize(tokenizer: PreTrainedTokenizerBase, example: Example) -> dict[str, list[int]]:
    """Input ids and labels (-100 on the prompt) of one example.

    The prompt is encoded exactly as serving encodes it; the answer is what the chat
    template appends after it, without the trailing newline.
    """
    from phishgate.core.render import encode_prompt

    prompt = list(encode_prompt(tokenizer, example.prompt_messages))
    full = [
        int(i)
        for i in tokenizer.apply_chat_template(
            [dict(m) for m in example.messages], tokenize=True, return_dict=False
        )
    ]
    if full[: len(prompt)] != prompt:
        raise ValueError(f"example {example.id}: the chat template does not extend its prompt")
    answer = full[len(prompt) :]
    while answer and not tokenizer.decode(answer[-1:]).strip():
        answer.pop()
    if not answer:
        raise ValueError(f"example {example.id} has no assistant answer")
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


class LeftPadCollator:
    """Left-pads a batch so that every answer ends at the last position.

    With `states` (the frozen lower layers' output per example, by the row's "index"), the
    batch carries them as `inputs_embeds` too: the upper layers start from there.
    """

    def __init__(self, pad_id: int, states: list[torch.Tensor] | None = None) -> None:
        self.pad_id = pad_id
        self.states = states

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        from phishgate.core.scoring import left_pad

        input_ids, attention_mask, position_ids = left_pad(
            [row["input_ids"] for row in rows], self.pad_id
        )
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        width = input_ids.shape[1]
        for i, row in enumerate(rows):
            labels[i, width - len(row["labels"]) :] = torch.tensor(row["labels"])
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "labels": labels,
        }
        if self.states is not None:
            from phishgate.training.frozen import pad_states

            batch["inputs_embeds"] = pad_states([self.states[row["index"]] for row in rows])
        return batch


def answer_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    frozen: FrozenLowerLayers | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens, computing logits for them only.

    With K trailing answer positions, the logits at positions -K-1 .. -2 predict them; the
    forward keeps the last K+1 logits and the last one is dropped. A batch with
    `inputs_embeds` runs the layers above `frozen` only, on those states.
    """
    import contextlib

    import torch.nn.functional as F

    labels = batch["labels"]
    columns = (labels != IGNORE_INDEX).nonzero(as_tuple=True)[1]
    window = int(labels.shape[1] - columns.min().item()) if len(columns) else 1
    inputs: dict[str, torch.Tensor] = {"input_ids": batch["input_ids"]}
    scope: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if "inputs_embeds" in batch:
        if frozen is None:
            raise ValueError("a batch with inputs_embeds needs the frozen layers it came from")
        inputs = {"inputs_embeds": batch["inputs_embeds"]}
        scope = frozen.upper_only()
    with scope:
        output = model(
            **inputs,
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            logits_to_keep=window + 1,
            use_cache=False,
        )
    logits = output.logits[:, :-1, :].float()
    targets = labels[:, -window:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


class Reporter(Protocol):
    """Where a worker's results go: Ray Train's session, or the in-process driver."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        """`checkpoint` (rank 0 only; None otherwise) is a folder valid during the call."""


class RayReporter:
    """The Ray Train session of this worker."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank = int(context.get_world_rank())
        self.world_size = int(context.get_world_size())

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        import ray.train

        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint))
            if checkpoint is not None
            else None,
        )


def train_worker(job: dict[str, Any]) -> None:
    """Ray Train entry point: `job` as `train_loop` takes it."""
    train_loop(job, RayReporter())


def train_loop(job: dict[str, Any], reporter: Reporter) -> None:
    """One worker's training: `job` holds the TrainConfig and CoreSettings as JSON dicts,
    the data folder and the worker's thread count."""
    import numpy as np
    import torch
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from phishgate.core.model import (
        compute_dtype,
        load_causal_lm,
        load_tokenizer,
        resolve_base_model,
    )
    from phishgate.core.render import rendered_from_messages
    from phishgate.core.scoring import TransformersScorer
    from phishgate.training.metrics import best_f1_threshold, binary_metrics

    config = TrainConfig.model_validate(job["config"])
    settings = CoreSettings.model_validate(job["settings"])
    task = get_task(config.task)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    rank = reporter.rank

    def say(line: str) -> None:
        if rank == 0:
            print(line, flush=True)

    data_dir = Path(job["data_dir"])
    train = sample(load_examples(data_dir / "train.jsonl"), config.max_train_examples, config.seed)
    # Each worker trains on its own shard; dev is scored by every worker, reported by rank 0.
    train = train[rank :: reporter.world_size]
    dev = sample(load_examples(data_dir / "dev.jsonl"), config.max_eval_examples, config.seed)

    base = resolve_base_model(settings)
    tokenizer = load_tokenizer(base.path)
    dtype = compute_dtype(config.dtype)
    model = load_causal_lm(base.path, dtype, **_quantization(config))
    if config.use_gpu and not config.quantize_4bit:
        model.to(f"cuda:{torch.cuda.current_device()}")  # where the frozen layers run too
    pad_id = tokenizer.pad_token_id or 0
    features = [featurize(tokenizer, e) for e in train]
    dataset = Dataset.from_list(
        [{**f, "index": i, "length": len(f["input_ids"])} for i, f in enumerate(features)]
    )
    dev_rendered = [rendered_from_messages(e.prompt_messages, task, tokenizer) for e in dev]
    dev_truth = [int(e.label == task.positive_label) for e in dev]
    say(
        f"worker {rank}: {len(train)} training examples, {len(dev)} dev, "
        f"{torch.get_num_threads()} threads, base weights in {dtype}"
    )
    history: list[EpochRecord] = []
    started = time.perf_counter()

    def score_dev(current: torch.nn.Module) -> tuple[EpochRecord, list[float]]:
        was_training = current.training
        current.eval()
        scorer = TransformersScorer(current, tokenizer, task, max_batch_size=config.batch_size)
        scores = np.array([s.score for s in scorer.score_batch(dev_rendered)])
        current.train(was_training)
        threshold = best_f1_threshold(dev_truth, scores)
        m = binary_metrics(dev_truth, scores, threshold)
        metrics = {
            "dev_f1": m.f1,
            "dev_precision": m.precision,
            "dev_recall": m.recall,
            "dev_roc_auc": m.roc_auc,
            "dev_pr_auc": m.pr_auc,
            "dev_ece": m.ece,
            "dev_accuracy": m.accuracy,
        }
        clean = {k: 0.0 if math.isnan(v) else float(v) for k, v in metrics.items()}
        record = EpochRecord(len(history), clean, threshold, time.perf_counter() - started)
        return record, scores.tolist()

    class EpochEnd(TrainerCallback):
        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            record, scores = score_dev(kwargs["model"])
            history.append(record)
            say(f"epoch {record.epoch}: dev F1 {record.metrics['dev_f1']:.4f}")
            metrics = {**record.metrics, "epoch": record.epoch, "threshold": record.threshold}
            if rank != 0:
                reporter.report(metrics, None)
                return
            with tempfile.TemporaryDirectory() as folder:
                kwargs["model"].save_pretrained(folder)
                (Path(folder) / HISTORY).write_text(
                    json.dumps([asdict(r) for r in history], indent=2) + "\n"
                )
                dev_scores = {"ids": [e.id for e in dev], "truth": dev_truth, "scores": scores}
                (Path(folder) / DEV_SCORES).write_text(json.dumps(dev_scores) + "\n")
                reporter.report(metrics, Path(folder))

    class StepLog(TrainerCallback):
        """Per-step loss and training tokens/s, on top of the trainer's own progress bar."""

        def __init__(self) -> None:
            self.last_time = time.perf_counter()
            self.last_tokens = 0

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            tokens = int(state.num_input_tokens_seen)
            elapsed = max(time.perf_counter() - self.last_time, 1e-9)
            rate = (tokens - self.last_tokens) / elapsed
            self.last_time, self.last_tokens = time.perf_counter(), tokens
            if logs and "loss" in logs:
                say(
                    f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                    f"tokens/s {rate:.0f}"
                )

    # Epoch 0: the base model on dev, the bar every fine-tune must clear.
    history.append(score_dev(model)[0])
    say(f"epoch 0 (base model): dev F1 {history[0].metrics['dev_f1']:.4f}")
    reporter.report({**history[0].metrics, "epoch": 0, "threshold": history[0].threshold}, None)

    lora = config.lora
    n_layers = int(model.config.num_hidden_layers)
    frozen = None
    states = None
    if lora.top_layers and lora.top_layers < n_layers and config.cache_frozen_layers:
        from phishgate.training.frozen import FrozenLowerLayers

        frozen = FrozenLowerLayers(model, n_layers - lora.top_layers)
        t0 = time.perf_counter()
        states = frozen.encode(
            [f["input_ids"] for f in features], pad_id=pad_id, batch_size=config.batch_size
        )
        seconds = time.perf_counter() - t0
        tokens = sum(len(f["input_ids"]) for f in features)
        say(
            f"frozen layers 0-{frozen.n_frozen - 1}: ran once over {len(features)} examples in "
            f"{seconds:.0f} s ({tokens / max(seconds, 1e-9):.0f} tokens/s)"
        )
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        layers_to_transform=(
            list(range(n_layers - lora.top_layers, n_layers)) if lora.top_layers else None
        ),
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=str(Path(tempfile.mkdtemp(prefix="phishgate-sft-"))),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a ratio of all steps
        lr_scheduler_type="linear",
        seed=config.seed,
        gradient_checkpointing=False,
        bf16=dtype == torch.bfloat16,
        use_cpu=not config.use_gpu,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        max_length=None,
        remove_unused_columns=False,
        include_num_input_tokens_seen=True,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        dataloader_num_workers=0,
        # Every LoRA weight gets a gradient each step: DDP (Ray Train's workers) need not
        # search the graph for unused ones (the trainer's default, which cost ~20% here).
        ddp_find_unused_parameters=False,
        disable_tqdm=rank != 0,
    )

    class AnswerOnlySFTTrainer(SFTTrainer):
        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, **kw: Any
        ) -> Any:
            loss = answer_loss(model, inputs, frozen)
            return (loss, None) if return_outputs else loss

    trainer = AnswerOnlySFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=LeftPadCollator(pad_id, states),
        peft_config=peft_config,
        callbacks=[EpochEnd(), StepLog()],
    )
    trainer.train()


def _quantization(config: TrainConfig) -> dict[str, Any]:
    """Model loading arguments for QLoRA (4-bit base, on this worker's GPU) when asked for;
    CUDA was checked before any work."""
    if not config.quantize_4bit:
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        "device_map": {"": torch.cuda.current_device()},
    }
