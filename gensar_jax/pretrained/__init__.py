"""Starting from pretrained T5 / T5.1.1 weights (Hugging Face safetensors or T5X).

  hf.py       Hugging Face folder: config.json, model.safetensors, spiece.model
  t5x.py      T5X checkpoint: checkpoint_<step>/checkpoint msgpack + tensorstore arrays
  params.py   checkpoint tensors -> our parameter tree; the vocabulary rows
  init.py     `load_pretrained` and the gin-configurable training start `PretrainedT5Init`

docs/pretrained.md says how to point a run at your weights.
"""
from gensar_jax.pretrained.init import PretrainedT5Init, load_pretrained, t5_config_from_hf

__all__ = ["PretrainedT5Init", "load_pretrained", "t5_config_from_hf"]
