"""Prometheus through ``prometheus-api-client``: one query in, one number (or None) out.

Works with any Prometheus HTTP API, including Alibaba Cloud ARMS (raw ``Authorization: <token>``
header) behind a private CA. Retries are kept to one quick attempt: a check that waits on a
struggling Prometheus delays a rollback, and the next check comes soon anyway.
"""

from __future__ import annotations

import base64
import contextlib
import math
from collections.abc import Iterator

import requests
import urllib3
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

from controller.core.results import RenderedQuery
from controller.core.text import bounded, redact_urls
from controller.errors import MetricsUnavailable
from controller.settings import PrometheusConnection

__all__ = ["PrometheusMetricsSource"]

#: Prometheus error bodies can be long (a whole PromQL parse error); reasons stay readable.
_MAX_ERROR_CHARS = 300


class PrometheusMetricsSource:
    """A MetricsSource backed by a Prometheus HTTP API."""

    #: Prometheus groups by labels: policies that share it share the built-in measures' queries
    answers_groups = True

    def __init__(self, connection: PrometheusConnection) -> None:
        session = requests.Session()
        session.verify = connection.ca_file or True
        # The environment's proxies are read once, here, for this URL (NO_PROXY included): with
        # trust_env on, requests reads every proxy variable and ~/.netrc again on each request,
        # about a third of a query's CPU (docs/benchmarks.md). No netrc: credentials are settings.
        session.proxies = requests.utils.get_environ_proxies(connection.url)
        session.trust_env = False
        self._url = redact_urls(connection.url)  # for messages: where, never who or which token
        self._timeout = connection.timeout_seconds
        self._client = PrometheusConnect(
            url=connection.url,
            headers=connection.headers or None,
            auth=connection.basic_auth,
            session=session,
            timeout=connection.timeout_seconds,
            retry=Retry(total=1, backoff_factor=0.05, status_forcelist=(502, 503, 504), allowed_methods=None),
        )
        self._secrets = _credentials(connection)
        self._session = session
        self._headers = connection.headers or None
        self._auth = connection.basic_auth

    def query(self, query: RenderedQuery) -> float | None:
        """Run an instant query; raise MetricsUnavailable with the cause, never return a guess.

        A 200 answer that is not what the API promises (no ``data``, another ``resultType``, a
        string or infinite value, many series) is unavailable too, with the reason: it is never a
        number to judge and never an exception out of the collector. Error bodies are cut short
        before they reach a reason, an Event or an alert, and the credentials this source sends are
        cut out of them (a server or proxy may echo the Authorization header it refused).
        """
        with self._credentials_cut():
            return _scalar(self._ask(query))

    def query_vector(self, query: RenderedQuery) -> list[tuple[dict[str, str], float]]:
        """Every series of an instant vector, with its labels; raise MetricsUnavailable as ``query``."""
        with self._credentials_cut():
            return self._vector(query)

    @contextlib.contextmanager
    def _credentials_cut(self) -> Iterator[None]:
        """A MetricsUnavailable whose message holds a credential this source sends is raised again
        with ``***`` in its place, unchained (the original holds it in its message and its cause)."""
        try:
            yield
        except MetricsUnavailable as exc:
            text = self._cut(str(exc))
            if text == str(exc):
                raise
            raise MetricsUnavailable(text) from None

    def _cut(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _short(self, exc: BaseException) -> str:
        """An error for a reason: credentials cut out first, then cut short (no half credential left)."""
        return bounded(self._cut(f"{type(exc).__name__}: {exc}"), _MAX_ERROR_CHARS)

    def _vector(self, query: RenderedQuery) -> list[tuple[dict[str, str], float]]:
        result = self._ask(query, form=True)
        if not isinstance(result, list) or any(not isinstance(s, dict) or "value" not in s for s in result):
            raise MetricsUnavailable("the query did not return an instant vector")
        series = []
        for sample in result:
            value = sample["value"]
            if not isinstance(value, list) or len(value) != 2:
                raise MetricsUnavailable(f"malformed sample {bounded(repr(value), 80)}")
            labels = sample.get("metric") or {}
            # an infinite value is kept: it is one group's (whoever reads it refuses it), not the answer's
            series.append(({str(k): str(v) for k, v in dict(labels).items()}, _float(value[1], infinite=True)))
        return series

    def _ask(self, query: RenderedQuery, *, form: bool = False) -> object:
        try:
            if form:
                return self._post(query.promql)
            return self._client.custom_query(query.promql, timeout=self._timeout)
        except PrometheusApiClientException as exc:
            raise MetricsUnavailable(f"Prometheus at {self._url} answered an error: {self._short(exc)}") from exc
        except (requests.exceptions.JSONDecodeError, KeyError, TypeError, IndexError) as exc:  # no data.result
            raise MetricsUnavailable(f"Prometheus at {self._url} sent a malformed answer: {self._short(exc)}") from exc
        except requests.RequestException as exc:
            if _timed_out(exc):  # a read timeout, retried, arrives as a ConnectionError
                raise MetricsUnavailable(f"Prometheus at {self._url} did not answer within {self._timeout:g}s") from exc
            raise MetricsUnavailable(f"Prometheus at {self._url} unreachable: {type(exc).__name__}") from exc
        except ValueError as exc:  # a body that is not JSON, from an older requests
            raise MetricsUnavailable(f"Prometheus at {self._url} sent a malformed answer: {self._short(exc)}") from exc

    def _post(self, promql: str) -> object:
        """An instant query in a form body: a query shared by hundreds of gateways names them all,
        longer than proxies accept in a URL (the HTTP API takes POST for that reason)."""
        response = self._session.post(
            f"{self._client.url}/api/v1/query",
            data={"query": promql},
            headers=self._headers,
            auth=self._auth,
            timeout=self._timeout,
            # named again, as prometheus-api-client does: requests lets REQUESTS_CA_BUNDLE or
            # CURL_CA_BUNDLE in the environment replace a session's CA file otherwise
            verify=self._session.verify,
        )
        if response.status_code != 200:
            raise PrometheusApiClientException(f"HTTP Status Code {response.status_code} ({response.content!r})")
        return response.json()["data"]["result"]

    def close(self) -> None:
        """Release the HTTP connection pool."""
        self._client.close()


def _timed_out(exc: requests.RequestException) -> bool:
    """Whether Prometheus took longer than the timeout (rather than refusing or failing the connection)."""
    if isinstance(exc, requests.Timeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    refused = isinstance(reason, urllib3.exceptions.NewConnectionError)  # a ConnectTimeoutError to urllib3
    return isinstance(reason, urllib3.exceptions.TimeoutError) and not refused


def _credentials(connection: PrometheusConnection) -> list[str]:
    """What a server could echo back of the credentials sent to it, longest first: each header value,
    the token without its scheme, the Basic password and its base64 form."""
    found: list[str] = []
    for value in connection.headers.values():
        found += [value, *value.split()[1:]]
    if connection.basic_auth is not None:
        user, password = connection.basic_auth
        if password:
            found += [password, base64.b64encode(f"{user}:{password}".encode()).decode()]
    return sorted({secret for secret in found if len(secret) >= 4}, key=len, reverse=True)


def _scalar(result: object) -> float | None:
    """One number from a vector (or scalar) result; an empty vector is None."""
    if isinstance(result, list) and len(result) == 2 and not isinstance(result[0], dict):
        return _float(result[1])  # resultType "scalar": [ts, "value"]
    if not isinstance(result, list):
        raise MetricsUnavailable(f"unexpected query result {type(result).__name__}")
    if not result:
        return None
    if len(result) > 1:
        raise MetricsUnavailable(
            f"the query returned {len(result)} series, a gate needs one: aggregate it, e.g. sum(...) or max(...)"
        )
    sample = result[0]
    if not isinstance(sample, dict) or "value" not in sample:
        raise MetricsUnavailable("the query returned a range, a gate needs an instant vector")
    value = sample["value"]
    if not isinstance(value, list) or len(value) != 2:
        raise MetricsUnavailable(f"malformed sample {bounded(repr(value), 80)}")
    return _float(value[1])


def _float(text: object, *, infinite: bool = False) -> float:
    """A sample's value: NaN is kept (a judged "not a number"), infinities (unless kept) and text are malformed."""
    try:
        value = float(str(text))
    except ValueError as exc:
        raise MetricsUnavailable(f"not a number in the answer: {bounded(repr(text), 80)}") from exc
    if math.isinf(value) and not infinite:
        raise MetricsUnavailable(f"the answer is {text}: no finite value to judge")
    return value
