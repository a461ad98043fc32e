"""What the language service and the gateway agree on about errors, beyond the gRPC status code."""

# Trailing metadata key naming the request field an INVALID_ARGUMENT is about: the gateway reports it as the
# OpenAI error's `param`.
PARAM_KEY = "dvd-param"

# On a vision server's INVALID_ARGUMENT about one file of an EncodeRequest: that file's index in `images`. The
# language server turns it into the conversation part it came from (e.g. "messages[0].content[1].video_url.url").
ITEM_KEY = "dvd-item"
