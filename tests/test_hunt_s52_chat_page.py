"""The chat page in headless Chromium (fixtures of test_chat_page): settings reach the request as
written, a bad one stops the turn with a message; an error after some text keeps the text; a server
that cannot be reached is named."""

import json

import pytest
from test_chat_page import WAIT, replies, server, browser, set_field  # noqa: F401 (fixtures)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow

#: fetch of /v1/chat/completions answers ``window.fakeBody`` (a whole event stream), or fails as
#: Chromium's fetch does when nothing listens where ``window.fakeBody`` is null; every request body
#: sent is kept in ``window.sent``.
FAKE = """
    window.sent = [];
    const realFetch = window.fetch;
    window.fetch = (url, options) => {
        if (options && options.body) window.sent.push(JSON.parse(options.body));
        if (url !== "/v1/chat/completions" || window.fakeBody === undefined) return realFetch(url, options);
        if (window.fakeBody === null) return Promise.reject(new TypeError("Failed to fetch"));
        return Promise.resolve(new Response(window.fakeBody, {status: 200, headers: {"Content-Type": "text/event-stream"}}));
    };
"""


def event(body):
    return "data: " + json.dumps(body) + "\n\n"


def chunk(text=None, finish=None):
    return event({"object": "chat.completion.chunk",
                  "choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]})


def open_page(server, browser, body=None):  # noqa: F811
    browser.get(server.url + "/")
    WebDriverWait(browser, WAIT).until(lambda b: "ckpt" in b.find_element(By.ID, "model-name").text)
    browser.execute_script(FAKE + ("" if body is None else "window.fakeBody = arguments[0];"), body)


def idle(browser):  # noqa: F811
    WebDriverWait(browser, WAIT, poll_frequency=0.2).until(
        lambda b: b.find_element(By.ID, "prompt").get_attribute("disabled") is None)


def errors(browser):  # noqa: F811
    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".message.error")]


def test_settings_reach_the_request_as_written_and_a_bad_one_is_refused(server, browser):  # noqa: F811
    """max tokens "1e3" (a number field's valid 1000) was sent as 1, "2.5" as 2 (parseInt); a field
    whose text is not a number ("1e") sent the default without a word."""
    open_page(server, browser)  # the real server: 2.5 is its 400
    set_field(browser, "max-tokens", "2.5")
    browser.find_element(By.ID, "prompt").send_keys("Hi\n")
    WebDriverWait(browser, WAIT).until(errors)
    assert errors(browser) == ["Error: max_tokens must be of type int"]
    assert browser.execute_script("return window.sent;")[0]["max_tokens"] == 2.5
    open_page(server, browser, chunk("Hello", "stop"))
    for field, value in (("max-tokens", "1e3"), ("temperature", "0.25"), ("top-p", "5e-1")):
        set_field(browser, field, value)
    browser.find_element(By.ID, "prompt").send_keys("Hi\n")
    idle(browser)
    sent = browser.execute_script("return window.sent;")
    assert [(s["max_tokens"], s["temperature"], s["top_p"]) for s in sent] == [(1000, 0.25, 0.5)]
    set_field(browser, "temperature", "1e")  # not a number: its value reads ""
    browser.find_element(By.ID, "prompt").send_keys("Again\n")
    WebDriverWait(browser, WAIT).until(errors)
    assert errors(browser) == ["Error: temperature is not a number"]
    assert len(browser.execute_script("return window.sent;")) == 1
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Again"
    set_field(browser, "temperature", "")  # empty: the page's default
    browser.find_element(By.ID, "prompt").send_keys("\n")
    idle(browser)
    assert browser.execute_script("return window.sent;")[1]["temperature"] == 0.7


def test_an_error_after_some_text_keeps_the_text(server, browser):  # noqa: F811
    """The server closing mid-reply ends the stream with an error event; the text streamed so far was
    removed with the reply (the question marked failed). It stays, marked incomplete with the
    server's message, and is in the conversation the next turn sends."""
    closed = {"error": {"message": "the server closed before this reply was complete",
                        "type": "server_error", "param": None, "code": None}}
    open_page(server, browser, chunk("Half a ") + chunk("reply") + event(closed))
    browser.find_element(By.ID, "prompt").send_keys("Hello?\n")
    idle(browser)
    reply = replies(browser)[0]
    assert reply.get_attribute("data-state") == "incomplete"
    assert reply.find_element(By.CLASS_NAME, "content").text == "Half a reply"
    assert reply.find_element(By.CLASS_NAME, "meta").text == (
        "incomplete: the server closed before this reply was complete")
    assert browser.find_element(By.CSS_SELECTOR, ".message.user").get_attribute("data-state") is None
    browser.execute_script("window.fakeBody = arguments[0];", chunk("Fine.", "stop"))
    browser.find_element(By.ID, "prompt").send_keys("Go on.\n")
    idle(browser)
    assert browser.execute_script("return window.sent;")[1]["messages"][1] == {
        "role": "assistant", "content": "Half a reply"}


def test_a_server_that_cannot_be_reached_is_named(server, browser):  # noqa: F811
    """Chromium's fetch says only "Failed to fetch" when the server is gone."""
    open_page(server, browser)
    browser.execute_script("window.fakeBody = null;")
    browser.find_element(By.ID, "prompt").send_keys("Hello?\n")
    WebDriverWait(browser, WAIT).until(errors)
    assert errors(browser) == ["Error: the server cannot be reached (Failed to fetch)"]
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Hello?"
