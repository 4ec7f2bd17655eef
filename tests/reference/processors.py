"""Oracles: the released transformers processors of the families, built from local files,
that qvl's renderings are checked and benchmarked against (tests and benchmarks only)."""

from __future__ import annotations

from pathlib import Path

from qvl.formats.families import family
from qvl.formats.families.vision import pixel_bounds
from qvl.formats.tokenizers import QWEN_PATTERN, qwen_ranks_path

# Qwen2-VL's (and Qwen2.5-VL's) chat template as released, images only
QWEN2_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] "
    "!= 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>"
    "{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>"
    "assistant\n{% endif %}")
# Qwen3-VL's, for conversations without tools or thinking: no default system message
QWEN3_TEMPLATE = QWEN2_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}", "")
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]



def reference_processor(name: str, folder: Path, min_pixels: int | None = None, max_pixels: int | None = None):
    """The transformers processor of a family, built from local files only (no download): its
    tokenizer.json from qwen.tiktoken with the family's special tokens and NFC, its image
    processor with the released settings, its chat template (images; no tools or thinking)."""
    from tokenizers import normalizers
    from transformers import (
        AutoProcessor,
        PreTrainedTokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )
    from transformers.convert_slow_tokenizer import TikTokenConverter

    fam = family(name)
    hf = TikTokenConverter(vocab_file=str(qwen_ranks_path()), pattern=QWEN_PATTERN,
                           extra_special_tokens=list(fam.specials)).converted()
    hf.normalizer = normalizers.NFC()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.image_token = "<|image_pad|>"
    patch = 16 if name == "qwen3-vl" else 14
    low, high = pixel_bounds(fam, min_pixels, max_pixels)
    images = Qwen2VLImageProcessor(
        patch_size=patch, merge_size=2, temporal_patch_size=2, image_mean=MEAN, std=STD, image_std=STD,
        size={"shortest_edge": low, "longest_edge": high})
    cls, video = (Qwen3VLProcessor, Qwen3VLVideoProcessor) if name == "qwen3-vl" else \
        (Qwen2VLProcessor, Qwen2VLVideoProcessor)
    template = QWEN3_TEMPLATE if name == "qwen3-vl" else QWEN2_TEMPLATE
    cls(image_processor=images, tokenizer=tokenizer, video_processor=video(), chat_template=template) \
        .save_pretrained(folder)
    return AutoProcessor.from_pretrained(folder)

