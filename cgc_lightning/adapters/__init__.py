"""The adapter math, one method family per file, importing only torch."""

from cgc_lightning.adapters.cgc_lora import CGCLoRA
from cgc_lightning.adapters.experts import Adapter, StackedExperts
from cgc_lightning.adapters.lora import IndependentLoRA, JointLoRA
from cgc_lightning.adapters.modula import MoDULA
from cgc_lightning.adapters.moelora import MoELoRA

__all__ = ["Adapter", "CGCLoRA", "IndependentLoRA", "JointLoRA", "MoDULA", "MoELoRA", "StackedExperts"]
