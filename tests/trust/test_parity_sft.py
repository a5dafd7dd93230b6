"""Our SFT loss equals TRL's (trl.SFTTrainer.compute_loss) on the same tiny model and batch, and our
assistant-only masks equal TRL's own tokenisation and masking, up to one documented difference.

TRL is a test dependency for exactly this. The batch is built by our data path (read -> render ->
mask -> collate), so the comparison covers what training really feeds the model; TRL computes its
loss its own way (a fused LM head that returns per-token log-probs) from the same input_ids/labels.

The known masking difference: TRL's Qwen2.5 training template puts `{% generation %}` around
"\\n" + content + "<|im_end|>\\n", so TRL also trains the "\\n" after "<|im_start|>assistant" and the
"\\n" after each assistant "<|im_end|>". We train content + "<|im_end|>" only: at inference the
generation prompt already holds the first "\\n", and the model stops at "<|im_end|>" before the
second (see lmpipeline/data/masking.py). Two tokens per assistant turn, nothing else.
"""

from __future__ import annotations

import json
import tempfile

import pytest
import torch

pytestmark = pytest.mark.integration

trl = pytest.importorskip("trl")


@pytest.fixture(autouse=True)
def _reset_accelerate():
    """transformers' Trainer leaves accelerate's process-wide state behind (with TRL's default bf16=True,
    a later Accelerator in this process would autocast to bf16): give the next test a clean one."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _trl_trainer(model, tokenizer, rows, **args):
    from datasets import Dataset

    # bf16=False: TRL's default is bf16; the comparison is in fp32, as our CPU runs are.
    config = trl.SFTConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, max_length=None,
                           dataset_num_proc=None, bf16=False, **args)
    return trl.SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def _our_batch(tiny_model, quickstart_data, tokenizer, tmp_path, **cfg):
    from lmpipeline.config.schema import SFTConfig
    from lmpipeline.data.build import build_sft_data, make_batch_plans

    config = SFTConfig(stage_name="sft", output_dir=str(tmp_path), dataset_name_or_path=str(quickstart_data / "sft_train.jsonl"),
                       max_samples=12, max_seq_length=128, assistant_only_loss=True, per_device_train_batch_size=6, **cfg)
    data = build_sft_data(config, tokenizer)
    plan, _ = make_batch_plans(config, data, tokenizer)
    return data, plan.collate(plan.epoch_batches(0)[0])


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sft_loss_equals_trl_compute_loss(tmp_path, tiny_model, quickstart_data, packing):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmpipeline.methods.sft import SFTObjective

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    _, batch = _our_batch(tiny_model, quickstart_data, tokenizer, tmp_path, packing=packing)
    if packing:
        assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch
    model = AutoModelForCausalLM.from_pretrained(tiny_model).train()
    objective = SFTObjective()
    with torch.no_grad():
        ours, _ = objective.loss(model, batch, objective.count(batch))

    # TRL patches the model it is given (fused LM head): give it its own copy of the same weights.
    trainer = _trl_trainer(AutoModelForCausalLM.from_pretrained(tiny_model), tokenizer,
                           [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}],
                           padding_free=packing)
    trainer.model.train()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in batch}
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, dict(inputs))
    assert float(ours) == pytest.approx(float(theirs), abs=1e-4)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)  # in fact much closer than required


def test_masks_equal_trl_generation_template_but_the_newlines(tmp_path, tiny_model, quickstart_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.chat_template_utils import qwen2_5_training_chat_template

    from lmpipeline.data.types import IGNORE_INDEX
    from lmpipeline.methods.sft import SFTObjective

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data, _ = _our_batch(tiny_model, quickstart_data, tokenizer, tmp_path, chat_template="qwen2.5")
    ours = {ex.source.line: ex for ex in data.train}
    lines = (quickstart_data / "sft_train.jsonl").read_text().splitlines()
    rows = [json.loads(lines[n - 1]) for n in sorted(ours)]

    trl_tok = AutoTokenizer.from_pretrained(tiny_model)
    trl_tok.chat_template = qwen2_5_training_chat_template
    trainer = _trl_trainer(AutoModelForCausalLM.from_pretrained(tiny_model), trl_tok, rows, assistant_only_loss=True)
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    header = tokenizer.encode("<|im_start|>assistant", add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    extra_total = 0
    for n, theirs in zip(sorted(ours), trainer.train_dataset):
        ex = ours[n]
        assert ex.input_ids == theirs["input_ids"], f"line {n}: different tokens"
        our_mask = [label != IGNORE_INDEX for label in ex.labels]
        trl_mask = [label != IGNORE_INDEX for label in theirs["labels"]]
        assert not any(o and not t for o, t in zip(our_mask, trl_mask)), f"line {n}: we train a token TRL does not"
        extra = [i for i, (o, t) in enumerate(zip(our_mask, trl_mask)) if t and not o]
        ids = ex.input_ids
        for i in extra:  # only the two documented newlines
            assert ids[i] == newline, f"line {n}: extra trained token {tokenizer.convert_ids_to_tokens(ids[i])}"
            after_header = ids[i - len(header):i] == header
            after_end = ids[i - 1] == end and our_mask[i - 1]
            assert after_header or after_end, f"line {n}: newline at {i} is not after an assistant header or end"
        turns = sum(1 for m in rows[sorted(ours).index(n)]["messages"] if m["role"] == "assistant")
        assert len(extra) == 2 * turns
        extra_total += len(extra)
    assert extra_total > 0

    # With those two tokens added to our labels, TRL's loss on its own tokenisation is ours.
    from lmpipeline.data.packing import collate_padded
    from lmpipeline.data.types import TokenizedExample

    widened = [TokenizedExample(ex.input_ids, list(t["labels"]), ex.source)
               for ex, t in zip((ours[n] for n in sorted(ours)), trainer.train_dataset)]
    batch = collate_padded(widened, tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    objective = SFTObjective()
    with torch.no_grad():
        ours_loss, _ = objective.loss(model, batch, objective.count(batch))
        collated = trainer.data_collator([{k: t[k] for k in ("input_ids", "labels")} for t in trainer.train_dataset])
        theirs_loss = trainer.compute_loss(trainer.model, {k: v for k, v in collated.items() if k != "completion_mask"})
    assert float(ours_loss) == pytest.approx(float(theirs_loss), abs=1e-4)
