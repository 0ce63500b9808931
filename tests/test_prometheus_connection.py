"""Connection options: auth header shapes (ARMS raw token, Bearer, basic), CA bundle over real TLS.

Prometheus itself cannot demand a bearer token and ARMS cannot be reached from here, so a loopback
server that records headers and answers in the Prometheus API's shape stands in for it.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import requests.certs

from controller.adapters.prometheus import PrometheusMetricsSource
from controller.core.enums import GatewayRole, Measure
from controller.core.policy import PrometheusSpec
from controller.core.results import RenderedQuery
from controller.errors import MetricsUnavailable
from controller.settings import PrometheusConnection, Settings

QUERY = RenderedQuery("vector(1)", Measure.CUSTOM, GatewayRole.TARGET)


class RecordingApi:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.headers: list[dict[str, str]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.headers.append(dict(self.headers))
                body = json.dumps(
                    {
                        "status": "success",
                        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "0.25"]}]},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET  # (a shared query is a form POST)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api():
    server = RecordingApi()
    yield server
    server.close()


def test_arms_raw_token_header_from_the_policy(api: RecordingApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CANARY_POLICY_ARMS_TOKEN", "tok-123")
    spec = PrometheusSpec(url=api.url, token_from_env="GATEWAY_CANARY_POLICY_ARMS_TOKEN", auth_scheme="")
    assert PrometheusMetricsSource(PrometheusConnection(Settings(), spec)).query(QUERY) == 0.25
    assert api.headers[-1]["Authorization"] == "tok-123"


def test_credentials_follow_their_url(api: RecordingApi, monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller-wide token and password go to the controller-wide Prometheus only."""
    settings = Settings(prometheus_token="global-token", prometheus_username="ak", prometheus_password="global-pw")
    elsewhere = PrometheusSpec(url=api.url)  # a policy that points somewhere else, naming no credentials
    PrometheusMetricsSource(PrometheusConnection(settings, elsewhere)).query(QUERY)
    assert "Authorization" not in api.headers[-1]
    monkeypatch.setenv("GATEWAY_CANARY_POLICY_OWN", "own-token")
    own = PrometheusSpec(url=api.url, token_from_env="GATEWAY_CANARY_POLICY_OWN")
    PrometheusMetricsSource(PrometheusConnection(settings, own)).query(QUERY)
    assert api.headers[-1]["Authorization"] == "Bearer own-token"
    same = Settings(prometheus_url=api.url, prometheus_token="global-token")
    PrometheusMetricsSource(PrometheusConnection(same, PrometheusSpec(timeout=3))).query(QUERY)
    assert api.headers[-1]["Authorization"] == "Bearer global-token"  # the same URL keeps them


def test_a_policy_may_read_only_allowed_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_PASSWORD", "hunter2")
    with pytest.raises(ValueError, match="DATABASE_PASSWORD may not be read by a policy") as caught:
        PrometheusConnection(Settings(), PrometheusSpec(url="http://evil.example", token_from_env="DATABASE_PASSWORD"))
    assert "hunter2" not in str(caught.value)
    custom = Settings(secret_env_pattern=r"^TEAM_[A-Z]+$")
    monkeypatch.setenv("TEAM_TOKEN", "t")
    assert PrometheusConnection(custom, PrometheusSpec(token_from_env="TEAM_TOKEN")).headers["Authorization"] == (
        "Bearer t"
    )


def test_bearer_token_and_basic_auth_from_settings(api: RecordingApi) -> None:
    source = PrometheusMetricsSource(PrometheusConnection(Settings(prometheus_url=api.url, prometheus_token="t"), None))
    source.query(QUERY)
    assert api.headers[-1]["Authorization"] == "Bearer t"
    basic = Settings(prometheus_url=api.url, prometheus_username="ak", prometheus_password="sk")
    PrometheusMetricsSource(PrometheusConnection(basic, None)).query(QUERY)
    assert api.headers[-1]["Authorization"] == "Basic " + base64.b64encode(b"ak:sk").decode()


def test_missing_token_variable_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="NOT_SET_ANYWHERE_TOKEN is not set"):
        PrometheusConnection(Settings(), PrometheusSpec(token_from_env="GATEWAY_CANARY_POLICY_NOT_SET_ANYWHERE_TOKEN"))


def test_ca_bundle_is_used_for_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = RecordingApi(tls=context)
    try:
        trusted = Settings(prometheus_url=server.url, prometheus_ca_file=cert)
        assert PrometheusMetricsSource(PrometheusConnection(trusted, None)).query(QUERY) == 0.25
        # requests lets a CA bundle named in the environment override a session's: never ours
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())
        monkeypatch.setenv("CURL_CA_BUNDLE", requests.certs.where())
        source = PrometheusMetricsSource(PrometheusConnection(trusted, None))
        assert source.query(QUERY) == 0.25
        assert source.query_vector(QUERY) == [({}, 0.25)]  # POSTed, as shared queries are
        untrusted = Settings(prometheus_url=server.url)
        with pytest.raises(MetricsUnavailable, match="unreachable: SSLError"):
            PrometheusMetricsSource(PrometheusConnection(untrusted, None)).query(QUERY)
    finally:
        server.close()


def test_the_environments_proxy_is_used_and_no_proxy_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Proxies come from the environment, read once when the source is built (not per request)."""
    proxy = RecordingApi()  # answers every request it is sent, as a forwarding proxy would
    try:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "")
        behind = Settings(prometheus_url="http://prometheus.invalid:9090", prometheus_timeout_seconds=2)
        source = PrometheusMetricsSource(PrometheusConnection(behind, None))
        assert source.query(QUERY) == 0.25
        assert source.query_vector(QUERY) == [({}, 0.25)]
        assert len(proxy.headers) == 2
        monkeypatch.setenv("NO_PROXY", "prometheus.invalid")
        direct = PrometheusMetricsSource(PrometheusConnection(behind, None))
        with pytest.raises(MetricsUnavailable, match="unreachable"):
            direct.query(QUERY)
        assert len(proxy.headers) == 2
    finally:
        proxy.close()
