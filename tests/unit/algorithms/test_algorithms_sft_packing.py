"""SFT masking on a packed batch, loss normalisation, and the packing helpers."""

from __future__ import annotations

import torch

from megatron_metis.algorithms.aggregation import local_loss_normalisers
from megatron_metis.algorithms.packing import (
    block_causal_mask,
    pack_sequences,
    position_ids_from_cu_seqlens,
    unpack,
)
from megatron_metis.algorithms.sft import (
    IGNORE_INDEX,
    ChatTokenIds,
    assistant_target_mask,
    next_token_targets,
    sft_loss,
)


def _ids(tiny_tokenizer, messages) -> torch.Tensor:
    return torch.tensor(tiny_tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])


CONV_A = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "<think>a</think><answer>2</answer>"},
]
CONV_B = [  # default system turn, an image in the user turn, two assistant turns
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
    {"role": "assistant", "content": "<answer>3</answer>"},
    {"role": "user", "content": "Sure?"},
    {"role": "assistant", "content": "yes"},
]


def test_assistant_mask_on_a_packed_batch_of_two_conversations(tiny_tokenizer):
    chat = ChatTokenIds.from_tokenizer(tiny_tokenizer)
    a, b = _ids(tiny_tokenizer, CONV_A), _ids(tiny_tokenizer, CONV_B)
    # conversation A: 24 tokens of system/user turns and "<|im_start|>assistant\n", then the
    # answer tokens and <|im_end|> (positions 24..38), then the final "\n" (39)
    assert a.tolist()[19:24] == [chat.im_start_id, *chat.assistant_role_ids, chat.newline_id]
    assert len(a) == 40
    row = pack_sequences([a, b], pad_id=tiny_tokenizer.pad_token_id, pad_to_multiple=8)
    mask_T = assistant_target_mask(row.tokens_T, chat, cu_seqlens_S1=row.cu_seqlens_S1)
    positions = torch.nonzero(mask_T).flatten().tolist()
    assert positions[:15] == list(range(24, 39))
    answer = "<think>a</think><answer>2</answer><|im_end|>"
    assert tiny_tokenizer.decode(row.tokens_T[24:39]) == answer
    # conversation B starts at 40: its two assistant turns, each with its <|im_end|>
    spans, start = [], None
    for p in positions[15:] + [-1]:
        if start is None:
            start, prev = p, p
        elif p != prev + 1:
            spans.append(tiny_tokenizer.decode(row.tokens_T[start : prev + 1]))
            start, prev = p, p
        else:
            prev = p
    assert spans == ["<answer>3</answer><|im_end|>", "yes<|im_end|>"]
    image_pad = tiny_tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert not mask_T[row.tokens_T == image_pad].any()
    assert not mask_T[row.num_tokens :].any()  # padding


def test_next_token_targets_do_not_cross_samples(tiny_tokenizer):
    chat = ChatTokenIds.from_tokenizer(tiny_tokenizer)
    a, b = _ids(tiny_tokenizer, CONV_A), _ids(tiny_tokenizer, CONV_B)
    row = pack_sequences([a, b], pad_id=tiny_tokenizer.pad_token_id)
    target_T = assistant_target_mask(row.tokens_T, chat, cu_seqlens_S1=row.cu_seqlens_S1)
    labels_T, loss_mask_T = next_token_targets(
        row.tokens_T, target_T, cu_seqlens_S1=row.cu_seqlens_S1
    )
    assert labels_T[:39].tolist() == a[1:].tolist()
    assert labels_T[39].item() == IGNORE_INDEX and not loss_mask_T[39]  # end of sample A
    assert labels_T[-1].item() == IGNORE_INDEX
    assert torch.nonzero(loss_mask_T[:40]).flatten().tolist() == list(range(23, 38))
    assert int(loss_mask_T.sum()) == int(target_T.sum())


def test_truncated_assistant_turn_is_a_target_to_the_end(tiny_tokenizer):
    chat = ChatTokenIds.from_tokenizer(tiny_tokenizer)
    ids = _ids(tiny_tokenizer, CONV_A)[:30]
    assert torch.nonzero(assistant_target_mask(ids, chat)).flatten().tolist() == list(range(24, 30))


def test_sft_loss_global_token_normalisation():
    # two micro-batches, 3 valid tokens in all: (1 + 2 + 3) / 3 = 2
    lp1, m1 = torch.tensor([-1.0, -2.0]), torch.tensor([1, 1])
    lp2, m2 = torch.tensor([-3.0, -9.0]), torch.tensor([1, 0])
    n = local_loss_normalisers(m1)[0] + local_loss_normalisers(m2)[0]
    l1, met1 = sft_loss(lp1, m1, num_global_tokens=n)
    l2, met2 = sft_loss(lp2, m2, num_global_tokens=n)
    assert (l1.item(), l2.item(), l1.item() + l2.item()) == (1.0, 1.0, 2.0)
    assert (met1["nll_sum"] + met2["nll_sum"]).item() == 6.0
    assert (met1["num_tokens"] + met2["num_tokens"]).item() == 3.0
    # per-sample normalisation: ((1 + 2) / 2 + 3 / 1) / 2 = 2.25
    lp_ST, m_ST = torch.tensor([[-1.0, -2.0], [-3.0, -9.0]]), torch.tensor([[1, 1], [1, 0]])
    loss, _ = sft_loss(lp_ST, m_ST, loss_norm="sequence", num_global_seqs=2)
    assert loss.item() == 2.25


def test_pack_positions_cu_seqlens_and_block_mask():
    row = pack_sequences(
        [torch.tensor([5, 6, 7]), torch.tensor([8, 9])], pad_id=0, pad_to_multiple=4
    )
    assert row.tokens_T.tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert row.position_ids_T.tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert row.cu_seqlens_S1.tolist() == [0, 3, 5]
    assert row.seq_ids_T.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert row.num_tokens == 5
    mask = block_causal_mask(row.cu_seqlens_S1, 8)
    assert mask.shape == (1, 1, 8, 8) and mask.dtype == torch.bool
    visible = (~mask[0, 0]).int().tolist()  # 1 = query (row) may attend to key (column)
    assert visible == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1, 1, 1],
    ]
    assert [t.tolist() for t in unpack(row.tokens_T, row.cu_seqlens_S1)] == [[5, 6, 7], [8, 9]]
    assert position_ids_from_cu_seqlens(torch.tensor([0, 2]), 2).tolist() == [0, 1]
