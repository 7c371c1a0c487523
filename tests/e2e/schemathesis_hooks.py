"""schemathesis hooks for tally's OpenAPI document (loaded by tests/e2e/openapi.rs).

`POST /v1/votes:batch` takes NDJSON, which schemathesis cannot write by itself: the document
describes the body as an array whose items are the lines.
"""
import json

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    if isinstance(value, list):
        return "".join(json.dumps(item) + "\n" for item in value).encode()
    return json.dumps(value).encode()
