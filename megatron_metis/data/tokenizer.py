"""A tiny Qwen2.5-style tokenizer built offline: byte-level BPE, Qwen special tokens, template.

The BPE is trained in a fraction of a second on a built-in corpus (the system prompt, the
synthetic tasks' wording, digits, LaTeX, the think/answer tags), so tiny models train fast on a
CPU. The 22 Qwen2.5 special tokens follow the BPE vocabulary in the Qwen2.5 order, and the chat
template is Qwen2.5-VL's (images as ``<|vision_start|><|image_pad|><|vision_end|>``).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from megatron_metis.config.data import METIS_SYSTEM_PROMPT

QWEN2_5_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Qwen2's pre-tokenizer: digits one by one, words with their leading space.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = (
    METIS_SYSTEM_PROMPT,
    "<think> Since $1+1=2$, so the answer is $2$. </think><answer> The answer is $\\boxed{2}$ "
    "</answer>",
    "How many red shapes are in the image? How many blue circles are there? green yellow "
    "purple orange black white square triangle circle shapes",
    "What number is shown in the image? What is the sum of the two numbers in the image? "
    "What is the product of the two numbers? What is the difference of the two numbers?",
    "Which bar is longer? Which bar is taller? Which shape has the larger area? left right "
    "top bottom first second A B C D (A) (B) (C) (D) Options: A. B. C. D.",
    "Compute 3 + 4. Compute 12 * 7. Compute 8 - 5. Solve for x: 3x + 4 = 19. Solve x + 2 = 9.",
    "I count the shapes one by one. The numbers are 4 and 7, so the sum is 4 + 7 = 11. "
    "Subtract 4 from both sides: 3x = 15, so x = 5. The left bar is longer than the right bar.",
    "\\frac{1}{2} \\sqrt{2} \\pi \\times \\cdot \\le \\ge \\neq \\infty \\{1, 2\\} [1, 3) "
    "x^2 + y^2 = z^2 60^\\circ 50\\% \\text{cm} \\begin{pmatrix} a & b \\\\ c & d \\end{pmatrix}",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 42 50 64 81 99 100",
    "The question asks for the value. Therefore, so, then, first, next, finally, we get.",
    "<think></think><answer></answer>\\boxed{} $$ = + - * / ( ) . , : ? !",
)


def build_tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE and wrap it as a Qwen2.5-VL-style fast tokenizer.

    Args:
        vocab_size: BPE vocabulary size before the 22 special tokens (>= 257; the built-in
            corpus supports about 1k merges, fewer are learnt if it runs out).
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (byte alphabet + 1), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeating the tags makes them single tokens early in the merge order.
    corpus = list(_CORPUS) * 4 + ["<think> </think> <answer> </answer>"] * 64
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(list(QWEN2_5_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
        model_max_length=32768,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )


def save_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 1024) -> Path:
    """Build the tiny tokenizer and ``save_pretrained`` it into ``out_dir`` (returned)."""
    out = Path(out_dir)
    build_tiny_tokenizer(vocab_size).save_pretrained(out)
    return out
