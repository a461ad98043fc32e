"""What the language service and the gateway agree on about errors, beyond the gRPC status code."""

# Trailing metadata key naming the request field an INVALID_ARGUMENT is about: the gateway reports it as the
# OpenAI error's `param`.
PARAM_KEY = "dvd-param"
