"""Corpus loading, tokenizers, uint16 token shards, caching and deterministic LM batches.

Typical use::

    prepared = prepare("path/to/corpus", tokenizer="bpe", vocab_size=4096)   # cached after the first call
    # or a pretrained tokenizer and a streamed dataset with a token budget (resumable):
    # prepare("hf:allenai/c4:en", tokenizer="hf:google-t5/t5-base", max_tokens=2_000_000_000)
    batches = TokenBatcher(prepared.train, seq_len=128, micro_batch_size=32, seed=0)
    x, y = next(batches)
    val = eval_batches(prepared.valid, seq_len=128, micro_batch_size=32, max_tokens=32_768)
"""

from gnopt.data.batches import Batch, TokenBatcher, corpus_too_small_check, eval_batches
from gnopt.data.cache import (
    DEFAULT_VALID_FRACTION,
    FORMAT_VERSION,
    PreparedData,
    cache_key,
    default_cache_dir,
    is_prepared_entry,
    prepare,
    split_tail,
)
from gnopt.data.shards import SHARD_MAGIC, SHARD_VERSION, read_shard, read_shard_header, write_shard
from gnopt.data.sources import (
    HF_MAX_CHARS,
    LoadedText,
    TextSource,
    parse_hf_spec,
    read_text_file,
    resolve_data,
    stdlib_source,
)
from gnopt.data.stats import data_statistics, unigram_entropy
from gnopt.data.tokenizer import (
    TOKENIZER_KINDS,
    BPETokenizer,
    ByteTokenizer,
    PretrainedTokenizer,
    Tokenizer,
    load_pretrained,
    load_tokenizer,
    make_tokenizer,
)

__all__ = [
    "Batch",
    "BPETokenizer",
    "ByteTokenizer",
    "DEFAULT_VALID_FRACTION",
    "FORMAT_VERSION",
    "HF_MAX_CHARS",
    "LoadedText",
    "PreparedData",
    "PretrainedTokenizer",
    "SHARD_MAGIC",
    "SHARD_VERSION",
    "TOKENIZER_KINDS",
    "TextSource",
    "TokenBatcher",
    "Tokenizer",
    "cache_key",
    "corpus_too_small_check",
    "data_statistics",
    "default_cache_dir",
    "eval_batches",
    "is_prepared_entry",
    "load_pretrained",
    "load_tokenizer",
    "make_tokenizer",
    "parse_hf_spec",
    "prepare",
    "read_shard",
    "read_shard_header",
    "read_text_file",
    "resolve_data",
    "split_tail",
    "stdlib_source",
    "unigram_entropy",
    "write_shard",
]
