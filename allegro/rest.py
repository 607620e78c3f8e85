"""REST framework defaults every API view shares: its JSON parser and exception handler.

Bad input gets a JSON answer that says what is wrong, never Django's HTML error page
or a 500: a body over DATA_UPLOAD_MAX_MEMORY_SIZE is a 413, JSON nested too deeply
to parse is a 400.
"""

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from rest_framework import parsers, status
from rest_framework.exceptions import ParseError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, answering 400 rather than 500 to absurdly nested JSON."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            # json.loads recurses once per nesting level; no real payload nests this deep.
            raise ParseError("JSON parse error - the body is nested too deeply.") from None


def exception_handler(exc, context):
    """Answer a body over the size limit with 413 and a JSON detail naming the limit."""
    if isinstance(exc, RequestDataTooBig):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return Response(
            {
                "detail": f"The request body is larger than the limit of {limit:,} bytes "
                f"({limit / 2**20:g} MiB, DATA_UPLOAD_MAX_MEMORY_SIZE); send it in smaller "
                "requests."
            },
            status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        )
    return drf_exception_handler(exc, context)
