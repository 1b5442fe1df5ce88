"""A compressed model as files that others load: with transformers alone, in a chosen dtype, with a card.

=====================  ==========================================================================
module                 job
=====================  ==========================================================================
``modeling_lowrank``   the modeling file copied into a saved transformers model (torch and
                       transformers only): the low-rank layer and the swap of the listed layers
``remote_code``        ``config.json`` with ``auto_map`` and the ranks, the modeling file's tail
                       naming the base classes, whether a model can be exported, and the base
                       config read back without remote code
``card``               the ``README.md`` model card
``dtype``              the dtype the weights are saved in
``plain_save``         transformers' ``save_pretrained`` refused on a model holding svdkit's layers
=====================  ==========================================================================

:mod:`svdkit.compression.saved` calls these when a compressed model is saved.
"""

from .card import model_card
from .dtype import parse_dtype
from .remote_code import MODELING_FILE, base_config, export_blocker, write_remote_code

__all__ = ["MODELING_FILE", "base_config", "export_blocker", "model_card", "parse_dtype", "write_remote_code"]
