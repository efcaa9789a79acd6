"""What turns API messages into prompt ids and model output into API objects: chat templates with
tools, tool-call parsers, reasoning parsers, and the grammars that constrain decoding."""
