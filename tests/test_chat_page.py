"""The chat page in a real browser: headless Chromium (Debian's chromium + chromium-driver, which
.ci/run installs) driven by Selenium against `xlstm-metal serve` on 127.0.0.1. The streamed
greedy reply equals the API's; the stop button stops a long reply; new chat clears; a refused
request shows the server's message."""

import json
import shutil
import time
import urllib.request

import pytest
from test_serve import write_checkpoint

pytest.importorskip("mlx_lm")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from xlstm_metal.serve import make_server, server_args  # noqa: E402

#: Generous waits: CI machines and this one are shared (the test passes in ~30 s when idle).
WAIT = 180
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                                          "(apt-get install chromium chromium-driver; .ci/run does)"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = write_checkpoint(tmp_path_factory.mktemp("page") / "ckpt")
    with make_server(server_args(ckpt, port=0, dtype="float32")).start() as srv:
        yield srv


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # A profile under pytest's temporary folder: without one Chromium leaves a profile folder in
    # /tmp (org.chromium.Chromium.*) at every run.
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def set_field(browser, element_id, value):
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def replies(browser):
    return browser.find_elements(By.CSS_SELECTOR, ".message.assistant")


def api_reply(url, messages, max_tokens):
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def test_streamed_greedy_reply_equals_the_api_and_stop_stops(server, browser):
    browser.get(server.url + "/")
    WebDriverWait(browser, WAIT).until(lambda b: "ckpt" in b.find_element(By.ID, "model-name").text)
    set_field(browser, "temperature", 0)
    set_field(browser, "top-p", 1)
    set_field(browser, "max-tokens", 60)
    # The page itself counts the pieces of text added to the reply: one per streamed delta. (How
    # many distinct lengths an observer sees depends on how the browser batches the network reads:
    # on a loaded machine all deltas can arrive in one read.)
    browser.execute_script("""
        window.pieces = 0;
        new MutationObserver(records => {
            for (const r of records)
                if (r.target.closest && r.target.closest('.message.assistant .content'))
                    window.pieces += [...r.addedNodes].filter(n => n.nodeType === Node.TEXT_NODE).length;
        }).observe(document.getElementById('messages'), {childList: true, subtree: true});
    """)
    browser.find_element(By.ID, "prompt").send_keys("Tell me about cats.")
    browser.find_element(By.ID, "send").click()
    reply = WebDriverWait(browser, WAIT).until(lambda b: replies(b)[0] if replies(b) else None)
    WebDriverWait(browser, WAIT, poll_frequency=0.25).until(lambda b: reply.get_attribute("data-state") != "streaming")
    assert reply.get_attribute("data-state") == "done"
    pieces = browser.execute_script("return window.pieces;")
    streamed = reply.find_element(By.CLASS_NAME, "content").get_attribute("textContent")
    expected = api_reply(server.url, [{"role": "user", "content": "Tell me about cats."}], 60)
    assert streamed == expected and len(expected) > 20
    assert pieces >= 2  # the reply was built delta by delta, not set at the end

    # The second turn re-sends the conversation; with greedy sampling it equals the API's answer.
    browser.find_element(By.ID, "prompt").send_keys("And dogs?")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, WAIT, poll_frequency=0.25).until(
        lambda b: len(replies(b)) == 2 and replies(b)[1].get_attribute("data-state") == "done")
    second = replies(browser)[1].find_element(By.CLASS_NAME, "content").get_attribute("textContent")
    history = [{"role": "user", "content": "Tell me about cats."}, {"role": "assistant", "content": expected},
               {"role": "user", "content": "And dogs?"}]
    assert second == api_reply(server.url, history, 60)

    # Stop: a reply of up to 100,000 tokens ends when the button is pressed, and stays ended.
    browser.find_element(By.ID, "new-chat").click()
    assert not replies(browser)
    set_field(browser, "max-tokens", 100000)
    browser.find_element(By.ID, "prompt").send_keys("Write a very long story.")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, WAIT, poll_frequency=0.25).until(
        lambda b: replies(b) and len(replies(b)[0].find_element(By.CLASS_NAME, "content").get_attribute(
            "textContent")) > 20)
    assert browser.find_element(By.ID, "send").get_attribute("disabled") is not None
    browser.find_element(By.ID, "stop").click()
    reply = replies(browser)[0]
    WebDriverWait(browser, WAIT, poll_frequency=0.25).until(lambda b: reply.get_attribute("data-state") == "stopped")
    text = reply.find_element(By.CLASS_NAME, "content").get_attribute("textContent")
    time.sleep(1.0)
    assert reply.find_element(By.CLASS_NAME, "content").get_attribute("textContent") == text
    assert browser.find_element(By.ID, "send").get_attribute("disabled") is None
    # The server gave the slot back: the next turn streams to completion.
    set_field(browser, "max-tokens", 8)
    browser.find_element(By.ID, "prompt").send_keys("Shorter, please.")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, WAIT, poll_frequency=0.25).until(
        lambda b: len(replies(b)) == 2 and replies(b)[1].get_attribute("data-state") == "done")


def test_a_refused_request_shows_the_servers_message(server, browser):
    """The server answers in OpenAI's error shape; the page shows its message in place of the reply."""
    browser.get(server.url + "/")
    WebDriverWait(browser, WAIT).until(lambda b: "ckpt" in b.find_element(By.ID, "model-name").text)
    set_field(browser, "temperature", -1)
    browser.find_element(By.ID, "prompt").send_keys("Hello?")
    browser.find_element(By.ID, "send").click()
    error = WebDriverWait(browser, WAIT).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".message.error"))[0]
    assert error.text == "Error: temperature must be at least 0"
    assert not replies(browser)


def test_enter_ending_an_input_methods_composition_does_not_send(server, browser):
    """Typing Japanese, Chinese or Korean, Enter picks the input method's candidate text (its keydown
    says isComposing, or keyCode 229 in Safari); it sent the half-typed message. Enter after the
    composition still sends."""
    browser.get(server.url + "/")
    WebDriverWait(browser, WAIT).until(lambda b: "ckpt" in b.find_element(By.ID, "model-name").text)
    set_field(browser, "max-tokens", 3)
    browser.find_element(By.ID, "prompt").send_keys("にほんご")
    for init in ("{key: 'Enter', isComposing: true}", "{key: 'Enter', keyCode: 229}"):
        browser.execute_script(f"""
            document.getElementById('prompt').dispatchEvent(
                new KeyboardEvent('keydown', {{...{init}, bubbles: true, cancelable: true}}));""")
    time.sleep(0.5)
    assert not browser.find_elements(By.CSS_SELECTOR, ".message")
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "にほんご"
    browser.execute_script("""
        document.getElementById('prompt').dispatchEvent(
            new KeyboardEvent('keydown', {key: 'Enter', bubbles: true, cancelable: true}));""")
    WebDriverWait(browser, WAIT, poll_frequency=0.25).until(
        lambda b: replies(b) and replies(b)[0].get_attribute("data-state") == "done")
    assert [m.find_element(By.CLASS_NAME, "content").text
            for m in browser.find_elements(By.CSS_SELECTOR, ".message.user")] == ["にほんご"]


#: A stand-in for the server's stream, in the page: fetch of /v1/chat/completions answers the chunks
#: of ``window.fakeChunks`` (delta texts; a finish_reason where ``window.fakeFinish`` gives one) and
#: ends the body there, as a server that goes away mid-reply does.
FAKE_STREAM = """
    const realFetch = window.fetch;
    window.fetch = (url, options) => {
        if (url !== "/v1/chat/completions") return realFetch(url, options);
        const encoder = new TextEncoder();
        const event = (delta, finish) => "data: " + JSON.stringify(
            {object: "chat.completion.chunk", choices: [{index: 0, delta: delta, finish_reason: finish}]}) + "\\n\\n";
        const body = new ReadableStream({start(controller) {
            for (const text of window.fakeChunks) controller.enqueue(encoder.encode(event({content: text}, null)));
            if (window.fakeFinish) {
                controller.enqueue(encoder.encode(event({}, window.fakeFinish)));
                controller.enqueue(encoder.encode("data: [DONE]\\n\\n"));
            }
            controller.close();
        }});
        return Promise.resolve(new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}}));
    };
"""


def test_a_reply_cut_off_by_the_connection_is_marked_incomplete(server, browser):
    """A stream whose body ends before its last chunk (no finish_reason: the server crashed or a proxy
    timed out mid-reply) was shown as a whole reply ("done"); it is marked incomplete, and a stream
    that ends properly is still done."""
    browser.get(server.url + "/")
    WebDriverWait(browser, WAIT).until(lambda b: "ckpt" in b.find_element(By.ID, "model-name").text)
    browser.execute_script(FAKE_STREAM + "window.fakeChunks = ['Half a ', 'reply']; window.fakeFinish = null;")
    browser.find_element(By.ID, "prompt").send_keys("Hello?\n")
    WebDriverWait(browser, WAIT, poll_frequency=0.25).until(
        lambda b: replies(b) and replies(b)[0].get_attribute("data-state") != "streaming")
    reply = replies(browser)[0]
    assert reply.get_attribute("data-state") == "incomplete"
    assert reply.find_element(By.CLASS_NAME, "content").text == "Half a reply"
    assert reply.find_element(By.CLASS_NAME, "meta").text == (
        "incomplete: the connection closed before the reply was complete")
    browser.execute_script("window.fakeChunks = ['A whole ', 'reply.']; window.fakeFinish = 'stop';")
    browser.find_element(By.ID, "prompt").send_keys("Again?\n")
    WebDriverWait(browser, WAIT, poll_frequency=0.25).until(
        lambda b: len(replies(b)) == 2 and replies(b)[1].get_attribute("data-state") != "streaming")
    reply = replies(browser)[1]
    assert (reply.get_attribute("data-state"), reply.get_attribute("data-finish")) == ("done", "stop")
    assert reply.find_element(By.CLASS_NAME, "content").text == "A whole reply."
    assert not reply.find_elements(By.CLASS_NAME, "meta")


def open_page_recording_requests(server, browser) -> None:
    """Open the chat page once the model is listed; every request body it sends is kept in
    ``window.sent`` (parsed JSON)."""
    browser.get(server.url + "/")
    WebDriverWait(browser, WAIT).until(lambda b: "ckpt" in b.find_element(By.ID, "model-name").text)
    browser.execute_script("""
        window.sent = [];
        const realFetch = window.fetch;
        window.fetch = (url, options) => {
            if (options && options.body) window.sent.push(JSON.parse(options.body));
            return realFetch(url, options);
        };""")


def test_a_reply_cut_off_at_max_tokens_says_so(server, browser):
    """A reply that ran into the max tokens setting (finish_reason "length") looked like a whole
    reply; it carries a note, which is not part of the text the next turn re-sends."""
    open_page_recording_requests(server, browser)
    set_field(browser, "temperature", 0)
    set_field(browser, "max-tokens", 5)
    for turn, text in enumerate(["Tell me about cats.", "More."]):
        browser.find_element(By.ID, "prompt").send_keys(text + "\n")
        WebDriverWait(browser, WAIT, poll_frequency=0.25).until(
            lambda b: len(replies(b)) == turn + 1 and replies(b)[turn].get_attribute("data-state") == "done")
    first = replies(browser)[0]
    assert first.get_attribute("data-finish") == "length"  # the test model has no EOS
    assert first.find_element(By.CLASS_NAME, "meta").text == "cut off at max tokens (5)"
    content = first.find_element(By.CLASS_NAME, "content").get_attribute("textContent")
    assert content == api_reply(server.url, [{"role": "user", "content": "Tell me about cats."}], 5)
    sent = browser.execute_script("return window.sent;")
    assert sent[1]["messages"][1] == {"role": "assistant", "content": content}
    assert sent[1]["max_tokens"] == 5


def test_a_failed_turn_is_marked_out_of_the_conversation_and_its_text_kept(server, browser):
    """A refused request's message leaves the conversation the next turn re-sends, but stayed on the
    page as a part of it, and its text was gone from the box: it is marked, and its text is back in
    the box, so that Enter sends it again (alone: the failed turn is not re-sent)."""
    open_page_recording_requests(server, browser)
    set_field(browser, "temperature", -1)
    set_field(browser, "max-tokens", 4)
    browser.find_element(By.ID, "prompt").send_keys("Hello, 世界?\n")
    WebDriverWait(browser, WAIT).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".message.error"))
    question = browser.find_element(By.CSS_SELECTOR, ".message.user")
    assert question.get_attribute("data-state") == "failed"
    assert question.find_element(By.CLASS_NAME, "meta").text == "not in the conversation: the request failed"
    WebDriverWait(browser, WAIT).until(lambda b: b.find_element(By.ID, "prompt").get_attribute("disabled") is None)
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Hello, 世界?"
    set_field(browser, "temperature", 0)
    browser.find_element(By.ID, "prompt").send_keys("\n")
    WebDriverWait(browser, WAIT, poll_frequency=0.25).until(
        lambda b: replies(b) and replies(b)[0].get_attribute("data-state") == "done")
    sent = browser.execute_script("return window.sent;")
    assert [body["messages"] for body in sent] == [[{"role": "user", "content": "Hello, 世界?"}]] * 2
    assert replies(browser)[0].find_element(By.CLASS_NAME, "content").get_attribute("textContent") == api_reply(
        server.url, [{"role": "user", "content": "Hello, 世界?"}], 4)


#: Holds back the first chunk of the next /v1/chat/completions stream (the server's, read through
#: the wrapped fetch) until the request is aborted: Stop is pressed before any text, deterministically.
#: The stream then fails as an aborted fetch's does (AbortError) and the server's is cancelled.
HOLD_FIRST_CHUNK = """
    window.holdFirstChunk = true;
    const fetchBeforeHold = window.fetch;
    window.fetch = async (url, options) => {
        const response = await fetchBeforeHold(url, options);
        if (url !== "/v1/chat/completions" || !window.holdFirstChunk || !response.ok) return response;
        window.holdFirstChunk = false;
        const reader = response.body.getReader();
        const signal = options.signal;
        const aborted = new Promise(resolve => signal.addEventListener("abort", resolve, {once: true}));
        const body = new ReadableStream({async pull(controller) {
            await aborted;
            reader.cancel().catch(() => {});
            controller.error(new DOMException("The user aborted a request.", "AbortError"));
        }});
        return new Response(body, {status: response.status, headers: response.headers});
    };
"""


def test_a_reply_stopped_before_any_text_is_not_in_the_conversation(server, browser):
    """Stop before the first token left an empty assistant message in the conversation, re-sent with
    the next turn ({"role": "assistant", "content": ""}); the turn is out of the conversation, marked,
    and its text is back in the box."""
    open_page_recording_requests(server, browser)
    browser.execute_script(HOLD_FIRST_CHUNK)
    set_field(browser, "temperature", 0)
    set_field(browser, "max-tokens", 3)
    browser.find_element(By.ID, "prompt").send_keys("Hello?\n")
    WebDriverWait(browser, WAIT).until(lambda b: b.find_element(By.ID, "stop").get_attribute("disabled") is None)
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, WAIT).until(lambda b: b.find_element(By.ID, "prompt").get_attribute("disabled") is None)
    question = browser.find_element(By.CSS_SELECTOR, ".message.user")
    assert question.get_attribute("data-state") == "stopped"
    assert question.find_element(By.CLASS_NAME, "meta").text == "not in the conversation: stopped before any reply"
    assert not replies(browser)
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Hello?"
    set_field(browser, "prompt", "Again?\n")
    WebDriverWait(browser, WAIT, poll_frequency=0.25).until(
        lambda b: replies(b) and replies(b)[-1].get_attribute("data-state") == "done")
    sent = browser.execute_script("return window.sent;")
    assert len(sent) == 2
    assert {"role": "assistant", "content": ""} not in sent[1]["messages"]
    assert sent[1]["messages"] == [{"role": "user", "content": "Again?"}]


#: A stream the test feeds: fetch of /v1/chat/completions answers a body whose chunks come from
#: ``window.feed(texts)`` (one delta each) until ``window.feed(null)`` ends it with finish_reason stop.
FED_STREAM = """
    const fetchBeforeFeed = window.fetch;
    window.fetch = (url, options) => {
        if (url !== "/v1/chat/completions") return fetchBeforeFeed(url, options);
        const encoder = new TextEncoder();
        const event = (delta, finish) => "data: " + JSON.stringify(
            {object: "chat.completion.chunk", choices: [{index: 0, delta: delta, finish_reason: finish}]}) + "\\n\\n";
        const body = new ReadableStream({start(controller) {
            window.feed = (texts) => {
                if (texts === null) {
                    controller.enqueue(encoder.encode(event({}, "stop") + "data: [DONE]\\n\\n"));
                    controller.close();
                } else for (const text of texts) controller.enqueue(encoder.encode(event({content: text}, null)));
            };
        }});
        return Promise.resolve(new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}}));
    };
"""


def test_the_view_follows_new_text_only_from_the_bottom(server, browser):
    """Every token scrolled the view to the newest text, even while the user had scrolled up to read
    earlier messages; it follows only while the view is at the bottom, and again once scrolled back."""
    browser.get(server.url + "/")
    WebDriverWait(browser, WAIT).until(lambda b: "ckpt" in b.find_element(By.ID, "model-name").text)
    browser.execute_script(FED_STREAM)
    browser.find_element(By.ID, "prompt").send_keys("Hello?\n")
    WebDriverWait(browser, WAIT).until(lambda b: b.execute_script("return !!window.feed;"))
    view = browser.find_element(By.ID, "messages")

    def feed_lines(first, count):
        """Feeds lines first..first+count-1 and waits until they are shown and two frames have passed
        (a scroll that follows them, or the user's scroll event, has happened)."""
        browser.execute_script("window.feed(arguments[0]);", [f"line {i}\n" for i in range(first, first + count)])
        WebDriverWait(browser, WAIT, poll_frequency=0.1).until(
            lambda b: f"line {first + count - 1}\n" in replies(b)[0].get_attribute("textContent"))
        settle()

    def settle():
        browser.execute_async_script(
            "const done = arguments[0]; requestAnimationFrame(() => requestAnimationFrame(() => done()));")

    def position():
        return browser.execute_script(
            "const v = arguments[0]; return [v.scrollTop, v.scrollHeight - v.clientHeight];", view)

    feed_lines(0, 80)  # the conversation is now several views tall; the view followed it
    top, bottom = position()
    assert bottom > 1000 and top >= bottom - 20  # (its padding may show or not)
    browser.execute_script("arguments[0].scrollTop = 300;", view)  # the user scrolls up to read
    settle()
    feed_lines(80, 30)
    top, bottom = position()
    assert top == 300 and bottom > 1300  # the text grew; the view stayed where the user put it
    browser.execute_script("arguments[0].scrollTop = arguments[0].scrollHeight;", view)  # back to the bottom
    settle()
    feed_lines(110, 30)
    top, new_bottom = position()
    assert new_bottom > bottom and top >= new_bottom - 4  # following again, to the very bottom
    browser.execute_script("window.feed(null);")
    WebDriverWait(browser, WAIT, poll_frequency=0.1).until(lambda b: replies(b)[0].get_attribute("data-state") == "done")
