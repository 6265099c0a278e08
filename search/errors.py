"""Why a search (or a relevance mark) cannot be answered: each error carries
the HTTP status the pages and the API give it, and a message the user can act on."""

from __future__ import annotations


class SearchError(Exception):
    """A search that cannot be answered; `status` is the HTTP status to give."""

    status = 400


class BadParameter(SearchError):
    status = 400


class UploadTooLarge(SearchError):
    status = 413


class NotFound(SearchError):
    status = 404


class IndexNotReady(SearchError):
    status = 503
