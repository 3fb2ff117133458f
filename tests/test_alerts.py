"""Alerts (mlplatform.alerts): payloads, de-duplication, rate limit, retried delivery, settings. Delivered over
real HTTP to a receiver on loopback; the clock is the outbox's own (injected), not the wall clock."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import get_args

import pytest

from mlplatform import alerts
from mlplatform.alerts import Alert, AlertSettings, Outbox, Webhook, parse_webhooks
from mlplatform.spec import SettingError


class Receiver:
    """An HTTP server on 127.0.0.1 that records each POSTed JSON body by path; `fail` answers 500 that many times."""

    def __init__(self):
        self.received: list[tuple[str, dict]] = []
        self.fail = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if receiver.fail > 0:
                    receiver.fail -= 1
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"webhook down")
                    return
                receiver.received.append((self.path, body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self, path: str) -> list[dict]:
        return [b for p, b in self.received if p == path]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _settings(receiver, **kw) -> AlertSettings:
    hooks = (Webhook(f"{receiver.url}/json", "json"), Webhook(f"{receiver.url}/slack", "slack"))
    return AlertSettings(webhooks=hooks, dagster_url="http://127.0.0.1:3000", **kw)


def _alert(kind="run_failure", key="run_failure:abc", **kw) -> Alert:
    return Alert(kind=kind, key=key, title="Run abc of retrain failed", text="step candidate_model failed: <boom> & co",
                 dataset="car_loan", dagster_run_url="http://127.0.0.1:3000/runs/abc",
                 lakefs_commit_url="http://127.0.0.1:8000/repositories/r/commits/c0ffee",
                 mlflow_url="http://127.0.0.1:5000/#/models/car_loan-model/versions/3",
                 fields={"job": "retrain", "run_id": "abc"}, **kw)


def test_each_alert_is_delivered_as_generic_json_and_as_a_slack_payload_with_its_links(receiver, tmp_path):
    outbox = Outbox(_settings(receiver), tmp_path / "outbox.db", clock=Clock())
    statuses, deliveries = outbox.send([_alert()])
    assert statuses == {"run_failure:abc": "queued"}
    assert [d.ok for d in deliveries] == [True, True]

    [generic] = receiver.bodies("/json")
    assert generic["kind"] == "run_failure" and generic["key"] == "run_failure:abc"
    assert generic["dataset"] == "car_loan" and generic["severity"] == "error"
    assert generic["links"] == {"dagster_run": "http://127.0.0.1:3000/runs/abc",
                                "lakefs_commit": "http://127.0.0.1:8000/repositories/r/commits/c0ffee",
                                "mlflow": "http://127.0.0.1:5000/#/models/car_loan-model/versions/3"}
    assert generic["fields"] == {"job": "retrain", "run_id": "abc"}

    [slack] = receiver.bodies("/slack")
    assert set(slack) == {"text", "blocks"}
    assert "Run abc of retrain failed" in slack["text"]
    assert slack["blocks"][0] == {"type": "header", "text": {"type": "plain_text", "text": "Run abc of retrain failed",
                                                             "emoji": True}}
    # mrkdwn control characters are escaped, links are Slack's <url|label>
    assert "&lt;boom&gt; &amp; co" in slack["blocks"][1]["text"]["text"]
    links = [b for b in slack["blocks"] if b["type"] == "context"][0]["elements"][0]["text"]
    assert "<http://127.0.0.1:3000/runs/abc|Dagster run>" in links
    assert "<http://127.0.0.1:8000/repositories/r/commits/c0ffee|lakeFS commit>" in links
    assert "<http://127.0.0.1:5000/#/models/car_loan-model/versions/3|MLflow>" in links
    fields = [b for b in slack["blocks"] if "fields" in b][0]["fields"]
    assert {"type": "mrkdwn", "text": "*job*\nretrain"} in fields


def test_the_same_event_is_delivered_once_however_often_it_is_submitted(receiver, tmp_path):
    clock = Clock()
    outbox = Outbox(_settings(receiver), tmp_path / "outbox.db", clock=clock)
    assert outbox.send([_alert()])[0] == {"run_failure:abc": "queued"}
    clock.t += 10
    # a sensor re-tick, or a restarted process with a new Outbox on the same state file
    again = Outbox(_settings(receiver), tmp_path / "outbox.db", clock=clock)
    assert again.send([_alert(), _alert()])[0] == {"run_failure:abc": "duplicate"}
    assert len(receiver.bodies("/json")) == 1 and len(receiver.bodies("/slack")) == 1


def test_each_event_kind_is_rate_limited_on_its_own_and_the_suppressed_are_counted(receiver, tmp_path):
    clock = Clock()
    outbox = Outbox(_settings(receiver, rate_limit=2, rate_window_seconds=600), tmp_path / "outbox.db", clock=clock)
    statuses, _ = outbox.send([_alert(key=f"run_failure:{i}") for i in range(5)])
    assert list(statuses.values()) == ["queued", "queued", "suppressed", "suppressed", "suppressed"]
    # another kind is not held back by run failures
    assert outbox.send([_alert(kind="drift", key="drift:1", severity="warning")])[0] == {"drift:1": "queued"}
    assert [b["key"] for b in receiver.bodies("/json")] == ["run_failure:0", "run_failure:1", "drift:1"]
    # once the window has passed, the next one goes out and says how many were suppressed before it
    clock.t += 601
    assert outbox.send([_alert(key="run_failure:9")])[0] == {"run_failure:9": "queued"}
    last = receiver.bodies("/json")[-1]
    assert last["key"] == "run_failure:9" and last["suppressed_since_last"] == 3
    assert "3 more `run_failure` alert(s) suppressed" in json.dumps(receiver.bodies("/slack")[-1])


def test_a_failed_delivery_is_logged_and_retried_later_never_raised(receiver, tmp_path, caplog):
    clock = Clock()
    outbox = Outbox(_settings(receiver), tmp_path / "outbox.db", clock=clock)
    receiver.fail = 2  # both webhooks answer 500 once
    statuses, deliveries = outbox.send([_alert()])
    assert statuses == {"run_failure:abc": "queued"}
    assert [d.ok for d in deliveries] == [False, False] and "HTTP 500" in deliveries[0].error
    assert "retried in 30s" in caplog.text
    assert outbox.pending() == 2
    assert outbox.deliver() == [], "retried before its delay"
    clock.t += 31
    assert [d.ok for d in outbox.deliver()] == [True, True]
    assert outbox.pending() == 0
    assert len(receiver.bodies("/json")) == 1 and len(receiver.bodies("/slack")) == 1


def test_an_unreachable_webhook_is_given_up_after_retry_for(tmp_path, caplog):
    from tooling.services import free_port

    clock = Clock()
    dead = AlertSettings(webhooks=(Webhook(f"http://127.0.0.1:{free_port()}/hook/SECRET-TOKEN"),),
                         retry_for_seconds=120, timeout_seconds=1)
    outbox = Outbox(dead, tmp_path / "outbox.db", clock=clock)
    assert outbox.send([_alert()])[1][0].ok is False
    clock.t += 200
    [last] = outbox.deliver()
    assert not last.ok and outbox.pending() == 0
    assert "giving up after 2 attempts" in caplog.text
    assert "SECRET-TOKEN" not in caplog.text, "the webhook's URL (a secret for Slack) is printed in the log"
    assert b"SECRET-TOKEN" not in (tmp_path / "outbox.db").read_bytes(), "the webhook URL is stored"


def test_alerts_off_or_a_kind_not_listed_are_recorded_not_sent(receiver, tmp_path):
    outbox = Outbox(_settings(receiver, kinds=("drift",)), tmp_path / "outbox.db", clock=Clock())
    assert outbox.send([_alert()])[0] == {"run_failure:abc": "disabled"}
    off = Outbox(_settings(receiver, enabled=False), tmp_path / "off.db", clock=Clock())
    assert off.send([_alert(key="drift:1", kind="drift")])[0] == {"drift:1": "disabled"}
    nowhere = Outbox(AlertSettings(), tmp_path / "none.db", clock=Clock())
    assert nowhere.send([_alert()])[0] == {"run_failure:abc": "no_webhook"}
    assert receiver.received == []


def test_webhooks_are_read_from_a_json_list_or_a_comma_list():
    assert parse_webhooks('[{"url": "https://hooks.slack.com/services/T/B/x", "format": "slack"}, '
                          '{"url": "http://127.0.0.1:9/a"}]') == [
        Webhook("https://hooks.slack.com/services/T/B/x", "slack"), Webhook("http://127.0.0.1:9/a", "json")]
    assert parse_webhooks("slack=https://hooks.example/x, http://127.0.0.1:9/a,json=http://h/b") == [
        Webhook("https://hooks.example/x", "slack"), Webhook("http://127.0.0.1:9/a", "json"),
        Webhook("http://h/b", "json")]
    assert parse_webhooks("") == []
    with pytest.raises(SettingError, match=r"MLP_ALERT_WEBHOOKS: 'teams' is not a webhook format"):
        parse_webhooks("teams=https://x/y")
    with pytest.raises(SettingError, match=r"MLP_ALERT_WEBHOOKS\[0\]: unknown keys \['secret'\]"):
        parse_webhooks('[{"url": "https://x/y", "secret": 1}]')
    with pytest.raises(SettingError, match=r"must start with http"):
        parse_webhooks("ftp://x/y")


def test_settings_come_from_the_spec_and_the_environment(tmp_path):
    from mlplatform.spec import AlertKind, load_spec

    spec_text = open(load_spec("car_loan").path).read() + (
        "\nalerts:\n  webhooks:\n    - {url: 'http://127.0.0.1:9/spec', format: slack}\n"
        "  events: [run_failure, rollback]\n  rate_limit: 3\n  rate_window: 15m\n  dagster_url: http://dagster.local\n")
    path = tmp_path / "car_loan.yaml"
    path.write_text(spec_text)
    spec = load_spec(path)
    s = AlertSettings.from_spec(spec, {"MLP_ALERT_WEBHOOKS": "http://127.0.0.1:9/env"})
    assert s.webhooks == (Webhook("http://127.0.0.1:9/spec", "slack"), Webhook("http://127.0.0.1:9/env", "json"))
    assert s.kinds == ("run_failure", "rollback") and s.rate_limit == 3 and s.rate_window_seconds == 900
    assert s.run_url("r1") == "http://dagster.local/runs/r1"
    assert AlertSettings.from_spec(spec, {"MLP_DAGSTER_URL": "http://127.0.0.1:3123/"}).run_url("r1") == \
        "http://127.0.0.1:3123/runs/r1"
    # the defaults: every kind alerts, links point to the local UI
    d = AlertSettings.from_spec(load_spec("car_loan"), {})
    assert d.kinds == alerts.KINDS == get_args(AlertKind) and d.webhooks == ()
    assert d.dagster_url == "http://127.0.0.1:3000"


def test_a_wrong_alerts_setting_is_named_with_its_path(tmp_path):
    from mlplatform.spec import load_spec

    path = tmp_path / "car_loan.yaml"
    path.write_text(open(load_spec("car_loan").path).read() + "\nalerts:\n  events: [run_failure, page_me]\n")
    with pytest.raises(SettingError, match=r"alerts\.events\[1\]"):
        load_spec(path)


def test_a_credential_quoted_in_an_alert_is_masked_before_it_is_stored_or_sent(receiver, tmp_path, monkeypatch):
    monkeypatch.setenv("LAKEFS_SECRET_ACCESS_KEY", "s3cr3t-key-value-123456")
    outbox = Outbox(_settings(receiver), tmp_path / "outbox.db", clock=Clock())
    leaky = Alert(kind="run_failure", key="run_failure:leak", title="Run failed",
                  text="auth failed for s3cr3t-key-value-123456 at postgresql://mlp:hunter2pass@db/mlflow",
                  fields={"error": "key s3cr3t-key-value-123456"})
    outbox.send([leaky])
    sent = json.dumps(receiver.received)
    assert "s3cr3t-key-value-123456" not in sent and "hunter2pass" not in sent
    assert "auth failed for ***" in receiver.bodies("/json")[0]["text"]
    assert b"s3cr3t-key-value-123456" not in (tmp_path / "outbox.db").read_bytes()
