"""Network parts. The imports below register the attention layers that live in their own
modules (``model.attention=linear``, ``efficient``, ``focused_linear``, ``nystrom``,
``performer``, ``sinkformer``, ``cbsa_learned``); a new attention is a module and a line here."""

from attnssl.nn import (  # noqa: F401  (registers them)
    cbsa_learned_attention,
    efficient_attention,
    focused_linear_attention,
    linear_attention,
    nystrom_attention,
    performer_attention,
    sinkformer_attention,
)
