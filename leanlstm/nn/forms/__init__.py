"""Weight forms: pluggable representations of one LSTM weight matrix (see ``base.WeightForm``)."""
from .base import FORMS, WeightForm, build_form, form_class
from .antman import GroupDense, GroupLowRank
from .blocksparse import BlockSparse
from .circulant import BlockCirculant
from .dense import Dense
from .doped import Doped
from .hybrid import Hybrid
from .kronecker import Kronecker, kron_factor_shapes
from .lowrank import LowRank
from .sparse import MaskedSparse, magnitude_mask

__all__ = ["FORMS", "WeightForm", "build_form", "form_class", "BlockCirculant", "BlockSparse", "Dense", "Doped", "GroupDense",
           "GroupLowRank", "Hybrid",
           "Kronecker", "kron_factor_shapes", "LowRank", "MaskedSparse", "magnitude_mask"]
