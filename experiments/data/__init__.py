"""Data for long-context training and evaluation: numpy arrays, no jax computation.

  dataset.py    make_dataset(config, split, process_index, process_count) -> a dataset
                whose batch(step) is a pure function of step (the batch API).
  config.py     the `data` config keys, defaults and checks.
  synthetic.py  passkey, multi-key needle, associative recall, variable tracking; the
                one entry point (SyntheticTask) for every synthetic task.
  ruler.py      RULER-style multi-value retrieval, common and frequent words.
  listops.py    ListOps as a language-model task and as classifier inputs.
  templates.py  the tasks' wording in each data.style ("natural", "compact").
  text.py       .txt / JSONL documents and memory-mapped .npy / .bin token arrays.
  packing.py    documents -> fixed-length rows with segment ids, positions, loss mask.
  tokenizer.py  built-in byte tokenizer; SentencePiece / Hugging Face loaders.
"""
from experiments.data.config import KINDS, DataConfig, default_config, parse_config
from experiments.data.dataset import (BATCH_KEYS, Dataset, PackedDataset, SPLITS,
                                      SyntheticDataset, global_indices, make_dataset)
from experiments.data.packing import pack_documents, pack_row, plan_rows
from experiments.data.synthetic import TASKS, Example, SyntheticTask, TaskSpec
from experiments.data.text import TokenStore, load_text, load_tokens
from experiments.data.tokenizer import ByteTokenizer, load_tokenizer
