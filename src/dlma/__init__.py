"""dlma: align a language model to an attribute without human preference labels.

Implements DLMA (Liu et al., ACL 2024): contrastive generation -> self-rewarding
score -> DPO shifted by that score. The modules follow the pipeline:
prompts -> generate -> reward -> train -> evaluate -> report.
"""

__version__ = "0.1.0"
