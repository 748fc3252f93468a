"""Network parts. The imports below register the attention layers that live in their own
modules (``model.attention=linear``, ``efficient``); a new attention is a module and a line here."""

from attnssl.nn import efficient_attention, linear_attention  # noqa: F401  (registers them)
