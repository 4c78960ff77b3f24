"""The /ui dashboard in headless Chromium against a real cluster; how its files are served."""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from browser import ARTIFACTS, ConsoleLog, chromium, find_chromium
from cluster import Cluster, wait_for

pytestmark = pytest.mark.slow

UI_TIMEOUT_MS = 30_000  # a loaded CI machine polls slowly; every wait is a poll, never a sleep
PAGES = ["overview", "nodes", "models", "replicas", "backends", "events", "usage", "keys"]


@pytest.fixture
def chromium_path() -> str:
    """The system's Chromium; the test skips (before any cluster starts) without one."""
    pytest.importorskip("playwright.sync_api", reason="playwright (a dev dependency) is missing")
    path = find_chromium()
    if path is None:
        pytest.skip(
            "no Chromium found: install Debian's `chromium` package (scripts/test does so when "
            "run as root) or set CORRAL_TEST_CHROMIUM"
        )
    return path


@pytest.fixture
def browser(chromium_path: str, cluster: Cluster) -> Iterator[Any]:
    """Chromium, launched after the cluster's (async) fixtures: Playwright's sync API runs an
    event loop of its own on this thread while it is open."""
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)
    with chromium(chromium_path) as b:
        yield b


def test_dashboard_drives_a_real_cluster(
    chromium_path: str, cluster: Cluster, browser: Any
) -> None:
    from playwright.sync_api import expect

    cluster.write_model("chat", options={"tokens": 4})
    cluster.write_model(
        "emb", options={"embedding_dim": 8}, scheduling={"node_selector": {"zone": "a"}}
    )
    cluster.start_frontend()
    cluster.start_worker("w1", labels="zone=a")
    cluster.start_worker("w2")
    url = cluster.url()
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(url + "/v1/chat/completions", json=chat, timeout=60).status_code == 200
    emb = {"model": "emb", "input": "hi"}
    assert httpx.post(url + "/v1/embeddings", json=emb, timeout=60).status_code == 200
    wait_for(lambda: len(cluster.replicas()) == 2, what="two loaded replicas")

    console = ConsoleLog()
    context = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme="light")
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    console.watch(page)

    # the admin API needs the admin key the frontend made in its data dir: sign in with it
    page.goto(url + "/ui")
    assert page.url == url + "/ui/"
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#login-reason")).to_contain_text("missing API key")
    page.locator("#login-key").fill(cluster.admin_key)
    page.locator("#login-form button").click()
    expect(page.locator("#login")).to_be_hidden()
    console.errors.clear()  # the keyless requests before signing in were refused, as they must
    expect(page.locator(".stat").first).to_have_text("2")  # two nodes
    expect(page.locator("#content")).to_contain_text("2 loaded")
    page.goto(url + "/ui/#/nodes")
    expect(row(page, "w1")).to_contain_text("healthy")
    expect(row(page, "w2")).to_contain_text("healthy")
    expect(row(page, "w1")).to_contain_text("zone=a")
    page.goto(url + "/ui/#/models")
    expect(row(page, "chat")).to_contain_text("sim")
    expect(row(page, "chat")).to_contain_text("1 loaded")
    expect(row(page, "emb")).to_contain_text("zone=a")
    page.goto(url + "/ui/#/replicas")
    expect(page.locator("#content")).to_contain_text("chat#")
    replica_node = cluster.replicas("chat")[0]["node_id"]
    name = next(n["name"] for n in cluster.nodes() if n["id"] == replica_node)
    expect(page.locator("#content tbody tr").first).to_contain_text(name)  # a name, not an id
    assert not console.errors, console.errors

    # drain w1 from the UI (after a confirmation), then undrain it
    page.goto(url + "/ui/#/nodes")
    row(page, "w1").get_by_role("button", name="Drain").click()
    save_screenshot(page, "dashboard-confirm.png")
    page.locator("dialog[data-kind=confirm] button[data-action=Drain]").click()
    expect(row(page, "w1").locator(".pill")).to_have_text("draining")
    assert cluster.node("w1", status="draining") is not None
    row(page, "w1").get_by_role("button", name="Undrain").click()
    expect(row(page, "w1").locator(".pill")).to_have_text("healthy")
    assert cluster.node("w1", status="healthy") is not None

    # labels edited in the UI arrive
    row(page, "w2").get_by_role("button", name="Labels").click()
    page.locator("#labels-text").fill("zone=b\ngpu=none")
    save_screenshot(page, "dashboard-labels.png")
    page.locator("dialog[data-kind=labels] button[data-action=Save]").click()
    expect(page.locator("dialog")).to_be_hidden()
    assert (cluster.node("w2") or {})["labels"] == {"zone": "b", "gpu": "none"}
    expect(row(page, "w2")).to_contain_text("gpu=none")

    # scheduling changed in the UI arrives; the API's error message shows in the dialog
    page.goto(url + "/ui/#/models")
    row(page, "chat").get_by_role("button", name="Scheduling").click()
    page.locator("#sched-delay").fill("-1")
    page.locator("dialog[data-kind=scheduling] button[data-action=Save]").click()
    expect(page.locator("dialog .dialog-error")).to_contain_text("scale_down_delay")
    page.locator("#sched-delay").fill("300")
    page.locator("#sched-max").fill("3")
    page.locator("dialog[data-kind=scheduling] button[data-action=Save]").click()
    expect(page.locator("dialog")).to_be_hidden()
    assert cluster.api("GET", "/api/models/chat/scheduling")["max_replicas"] == 3
    expect(row(page, "chat")).to_contain_text("0 / 3")

    # the screenshot of the overview (the README's picture)
    page.goto(url + "/ui/#/overview")
    expect(page.locator("#content")).to_contain_text("model.scheduling")
    shot = save_screenshot(page, "dashboard.png")
    print(f"dashboard screenshot: {shot} (one per page beside it)")
    for name in PAGES:
        page.goto(f"{url}/ui/#/{name}")
        expect(page.locator("#content")).not_to_contain_text("Loading…")
        save_screenshot(page, f"dashboard-{name}.png")

    check_phone_viewport(browser, url, cluster.admin_key)

    # stop a replica from the UI (after a confirmation)
    page.goto(url + "/ui/#/replicas")
    replica = next(r for r in cluster.replicas("chat") if r["state"] == "loaded")
    name = f"chat#{replica['index']}"
    row(page, name).get_by_role("button", name="Stop").click()
    page.locator("dialog[data-kind=confirm] button[data-action=Stop]").click()
    expect(row(page, name)).to_have_count(0)
    assert replica["index"] not in [r["index"] for r in cluster.replicas("chat")]

    # an inference key created in the UI works on /v1, which it closes to keyless clients;
    # the admin API does not take it: signed in with it, the sign-in form comes back
    page.goto(url + "/ui/#/keys")
    page.locator("#key-name").fill("ci")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-key-secret").inner_text().strip()
    assert secret.startswith("sk-corral-")
    auth = {"authorization": f"Bearer {secret}"}
    answer = httpx.post(url + "/v1/chat/completions", json=chat, headers=auth, timeout=60)
    assert answer.status_code == 200, answer.text
    assert httpx.post(url + "/v1/chat/completions", json=chat, timeout=60).status_code == 401
    page.locator("dialog[data-kind=secret] button[data-action=Done]").click()
    page.locator("#logout").click()
    expect(page.locator("#login")).to_be_visible()

    page.locator("#login-key").fill("not-a-key")
    page.locator("#login-form button").click()
    expect(page.locator("#login-reason")).to_contain_text("invalid API key")
    page.locator("#login-key").fill(secret)
    page.locator("#login-form button").click()
    expect(page.locator("#login-reason")).to_contain_text("inference key")
    page.locator("#login-key").fill(cluster.admin_key)
    page.locator("#login-form button").click()
    expect(page.locator("#login")).to_be_hidden()
    (key,) = cluster.api("GET", "/api/keys")["keys"]
    assert key["role"] == "inference"
    expect(row(page, key["id"])).to_contain_text("ci")
    expect(row(page, key["id"])).to_contain_text("inference")

    # a second key, revoked from the UI
    page.locator("#key-name").fill("temporary")
    page.get_by_role("button", name="Create key").click()
    page.locator("dialog[data-kind=secret] button[data-action=Done]").click()
    (temporary,) = [k for k in cluster.api("GET", "/api/keys")["keys"] if k["name"] == "temporary"]
    row(page, temporary["id"]).get_by_role("button", name="Revoke").click()
    page.locator("dialog[data-kind=confirm] button[data-action=Revoke]").click()
    expect(row(page, temporary["id"])).to_have_count(0)
    assert [k["name"] for k in cluster.api("GET", "/api/keys")["keys"]] == ["ci"]
    expect(page.locator("#logout")).to_be_visible()
    context.close()

    unexpected = [e for e in console.errors if not expected_console_error(*e)]
    assert not unexpected, unexpected


# The dashboard's pure helpers, run in the browser on table inputs: (module, call, expected).
LOGIC_CASES: list[tuple[str, str, Any]] = [
    ("dom", "m.parsePairs('a=1\\n b = 2 \\n\\nk=v=w')", {"a": "1", "b": "2", "k": "v=w"}),
    (
        "dom",
        "(() => { try { m.parsePairs('ok=1\\nbad') } catch (e) { return e.message } })()",
        "line 2: write key=value",
    ),
    ("dom", "m.parsePairs('=x').length", None),  # throws: an empty key
    ("dom", "m.formatPairs({a: '1', b: '2'})", "a=1\nb=2"),
    (
        "dom",
        "[m.bytes(999), m.bytes(1500), m.bytes(20.2e9), m.bytes(null)]",
        ["999 B", "1.5 KB", "20.2 GB", "—"],
    ),
    (
        "dom",
        "[m.tone('draining'), m.tone('loaded'), m.tone('failed'), m.tone('x')]",
        ["warn", "ok", "bad", ""],
    ),
    (
        "dom",
        "[m.ago(0), m.ago(Date.now() / 1000 - 5), m.ago(Date.now() / 1000 - 600)]",
        ["never", "5 s ago", "10 min ago"],
    ),
    (
        "cluster",
        "m.budgetBytes({memory_budget: '80%', resources: {ram_total: 1e9, gpus: []}})",
        {"ram": 8e8, "vram": 0},
    ),
    (
        "cluster",
        "m.budgetBytes({memory_budget: '50%', resources: {ram_total: 2e9, "
        "gpus: [{memory_total: 4e9}, {memory_total: 4e9}]}})",
        {"ram": 1e9, "vram": 4e9},
    ),
    (
        "cluster",
        "m.budgetBytes({memory_budget: '12.0 GB', resources: {ram_total: 64e9}})",
        {"ram": 12e9, "vram": 0},
    ),
    (
        "cluster",
        "m.reserved('n1', [{node_id: 'n1', state: 'loaded', memory: 5}, "
        "{node_id: 'n1', state: 'unloading', memory: 7}, {node_id: 'n2', state: 'loaded', "
        "memory: 11}, {node_id: 'n1', state: 'loading', memory: 13}])",
        18,
    ),
    (
        "cluster",
        "m.withNames('w1 (id-1) at h; id-1 again; id-2', new Map([['id-1', {name: 'w1'}]]))",
        "w1 at h; w1 again; id-2",
    ),
    (
        "cluster",
        "m.activeLoads({jobs: [{model: 'a', state: 'loading', percent: null, "
        "elapsed: 3}], progress: {a: {model: 'a', state: 'loading', percent: 40, phase: 'p', "
        "elapsed: null}, b: {model: 'b', state: 'loaded'}, c: {model: 'c', state: 'staging'}}})",
        [
            {"model": "a", "state": "loading", "percent": 40, "phase": "p", "elapsed": 3},
            {"model": "c", "state": "staging"},
        ],
    ),
]


def test_dashboard_helpers(chromium_path: str, cluster: Cluster, browser: Any) -> None:
    cluster.start_frontend()
    page = browser.new_page()
    page.goto(cluster.url() + "/ui/")  # modules load from the page's own origin
    for module, call, expected in LOGIC_CASES:
        script = f"async () => {{ const m = await import('./js/{module}.js'); return {call}; }}"
        if expected is None:
            with pytest.raises(Exception, match="line 1"):
                page.evaluate(script)
            continue
        assert page.evaluate(script) == expected, call


def test_ui_files_are_served_safely(cluster: Cluster) -> None:
    cluster.start_frontend()
    url = cluster.url()

    redirect = httpx.get(url + "/ui")
    assert redirect.status_code == 308 and redirect.headers["location"] == "ui/"
    index = httpx.get(url + "/ui", follow_redirects=True)
    assert index.status_code == 200 and str(index.url) == url + "/ui/"
    assert index.headers["content-type"] == "text/html; charset=utf-8"
    assert index.headers["cache-control"] == "no-cache"
    assert index.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in index.headers["content-security-policy"]
    assert "<title>Corral</title>" in index.text

    for path, content_type in [
        ("/ui/js/app.js", "text/javascript; charset=utf-8"),
        ("/ui/js/pages/nodes.js", "text/javascript; charset=utf-8"),
        ("/ui/style.css", "text/css; charset=utf-8"),
        ("/ui/icon.svg", "image/svg+xml"),
    ]:
        r = httpx.get(url + path)
        assert r.status_code == 200 and r.headers["content-type"] == content_type, path
        assert r.headers["cache-control"] == "no-cache" and r.headers["etag"], path
        again = httpx.get(url + path, headers={"if-none-match": r.headers["etag"]})
        assert again.status_code == 304 and again.content == b"", path
        assert httpx.get(url + path, headers={"if-none-match": '"stale"'}).status_code == 200
        # nothing comes from the internet (an XML namespace is a name, not a fetch)
        assert not re.search(r'(?<!xmlns=")https?://', r.text), path

    head = httpx.head(url + "/ui/")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(index.content)
    post = httpx.post(url + "/ui/")
    assert post.status_code == 405 and post.json()["error"]["code"] == "method_not_allowed"
    for path in ["/ui/nodes", "/ui/no-such-file.js", "/ui/js/", "/ui/%00"]:
        missing = httpx.get(url + path)
        assert missing.status_code == 404, path
        assert missing.json()["error"]["code"] == "not_found", path

    # path traversal, sent byte for byte (an HTTP client would normalise the dots away)
    for raw in [
        "/ui/../../etc/passwd",
        "/ui/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/ui/..%2f..%2f..%2fetc%2fpasswd",
        "/ui/%2e%2e%5c%2e%2e%5cetc%5cpasswd",
        "/ui/..\\..\\etc\\passwd",
        "/ui//etc/passwd",
        "/ui/../__init__.py",
        "/ui/%2e%2e/__init__.py",
        "/ui/js/../../__init__.py",
        "/ui/%252e%252e/%252e%252e/etc/passwd",
    ]:
        status, body = raw_get(url, raw)
        assert status in (400, 404), (raw, status)
        assert b"root:" not in body and b"import" not in body, raw


def row(page: Any, key: str) -> Any:
    return page.locator(f'tr[data-row="{key}"]')


def save_screenshot(page: Any, name: str) -> str:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.mouse.move(0, page.viewport_size["height"] - 1)  # no hover highlight in the picture
    page.screenshot(path=str(path))
    return str(path)


def check_phone_viewport(browser: Any, url: str, key: str) -> None:
    """At 390x844 no page overflows sideways; the nav folds into the menu button."""
    from playwright.sync_api import expect

    context = browser.new_context(
        viewport={"width": 390, "height": 844}, is_mobile=True, color_scheme="dark"
    )
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(url + "/ui/")
    page.locator("#login-key").fill(key)  # a new context: signed in again
    page.locator("#login-form button").click()
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#nav")).to_be_hidden()
    page.locator("#menu-toggle").click()
    expect(page.locator("#nav")).to_be_visible()
    page.locator('#nav a[data-page="nodes"]').click()
    expect(page.locator("#nav")).to_be_hidden()
    for name in PAGES:
        page.goto(f"{url}/ui/#/{name}")
        expect(page.locator(f'#nav a[data-page="{name}"]')).to_have_class("active")
        expect(page.locator("#content")).not_to_contain_text("Loading…")
        overflow = page.evaluate(
            "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        )
        assert overflow[0] <= overflow[1], (name, overflow)
    page.goto(url + "/ui/#/nodes")
    expect(row(page, "w1")).to_be_visible()
    save_screenshot(page, "dashboard-phone.png")
    context.close()


def expected_console_error(text: str, source: str) -> bool:
    """Failed requests the dashboard makes on purpose (the browser logs each one)."""
    if not text.startswith("Failed to load resource"):
        return False
    path = urlsplit(source).path
    return (
        ("404" in text and path == "/api/usage")  # not on this frontend yet: shown as a note
        or ("405" in text and path.endswith("/scheduling"))  # PATCH probed, PUT used
        or ("400" in text and path.endswith("/scheduling"))  # the refused value, on purpose
        or ("401" in text and path.startswith("/api/"))  # before signing in, a wrong key
        or ("403" in text and path.startswith("/api/"))  # signed in with an inference key
    )


def raw_get(url: str, raw_path: str) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.putrequest("GET", raw_path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
