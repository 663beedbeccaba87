"""White-box tools: interventions inside the pure forward, activation capture, the logit lens.

    from jaxpost.models import forward
    from jaxpost.whitebox import AddVector, Capture, Patch, logit_lens

The intervention mechanism itself (sites, `Fn`, `Capture`, `Context`) lives beside the model in
`jaxpost.models.sites`; this package holds what is built on it.
"""

from jaxpost.models.sites import SITES, Capture, Context, Fn
from jaxpost.whitebox.interventions import Ablate, AddVector, LowRankEdit, Patch, ProjectOut
from jaxpost.whitebox.lens import logit_lens
from jaxpost.whitebox.activations import last_token_activations
from jaxpost.whitebox.attribution import (head_attribution, head_attribution_loop, knockout,
                                          target_logprob_metric)
from jaxpost.whitebox.probes import Probe, fit_probe, probe_layers, probe_predict
from jaxpost.whitebox.steering import contrastive_vector, steered_generations, steering_vector

__all__ = ["Ablate", "AddVector", "Capture", "Context", "Fn", "LowRankEdit", "Patch", "ProjectOut", "SITES",
           "logit_lens",
           # steering (CAA), probes, head knockout
           "Probe", "contrastive_vector", "fit_probe", "head_attribution",
           "head_attribution_loop", "knockout", "last_token_activations", "probe_layers",
           "probe_predict", "steered_generations", "steering_vector", "target_logprob_metric"]
