"""Block-by-block reconstruction on a tiny quantized Llama."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qpeft
from qpeft.recover.blockwise import find_blocks, reconstruct_blocks


def _forward(model, batch):
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits


def _pair():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    teacher, student = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
    student.load_state_dict(teacher.state_dict())
    qpeft.quantize(student, "int4")
    qpeft.update_model(student, {"adapter_cfg": {"*layers*": {"rank": 4}}})
    g = torch.Generator().manual_seed(1)
    batches = [
        {
            "input_ids": torch.randint(0, 64, (4, 12), generator=g),
            "attention_mask": torch.ones(4, 12, dtype=torch.long),
        }
        for _ in range(3)
    ]
    batches[0]["attention_mask"][:, 9:] = 0  # padding must not count
    return teacher, student, batches


def test_find_blocks_picks_the_decoder_layers():
    _, student, _ = _pair()
    name, blocks = find_blocks(student)
    assert name == "model.layers" and len(blocks) == 2


def test_find_blocks_without_lora_is_an_error():
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_reconstruction_lowers_every_block_error_and_trains_only_adapters():
    teacher, student, batches = _pair()
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    steps = []
    report = reconstruct_blocks(
        student, teacher, _forward, batches, epochs=8, lr=1e-2, seed=0, progress=steps.append
    )
    assert len(steps) == len(report.losses) == 8 * 3 * 2
    assert all(after < before for before, after in zip(report.before, report.after, strict=True))
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)


def test_zero_epochs_only_measure():
    teacher, student, batches = _pair()
    report = reconstruct_blocks(student, teacher, _forward, batches, epochs=0, lr=1e-2, seed=0)
    assert report.losses == [] and report.before == report.after


def test_ten_steps_per_block_train_where_torchs_one_cycle_warm_up_would_be_one_step():
    """10 steps x 10% warm-up is a one-step phase, on which torch's OneCycleLR divides by zero;
    the schedule then warms up over two steps."""
    teacher, student, batches = _pair()
    batches = (batches * 4)[:10]  # one epoch of 10 batches: 10 steps per block
    report = reconstruct_blocks(student, teacher, _forward, batches, epochs=1, lr=1e-2, seed=0)
    assert len(report.losses) == 20 and all(after < 1 for after in report.after)
