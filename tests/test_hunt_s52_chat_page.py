"""The chat page in headless Chromium (test_chat_page's fixtures)."""

import json

import pytest
from test_chat_page import WAIT, replies, server, browser, set_field  # noqa: F401, F811 (fixtures)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.slow

#: /v1/chat/completions answers window.fakeBody (an event stream; null: fetch fails); bodies sent: window.sent
FAKE = """window.sent = []; const realFetch = window.fetch;
window.fetch = (url, options) => {
  if (options && options.body) window.sent.push(JSON.parse(options.body));
  if (url !== "/v1/chat/completions" || window.fakeBody === undefined) return realFetch(url, options);
  if (window.fakeBody === null) return Promise.reject(new TypeError("Failed to fetch"));
  return Promise.resolve(new Response(window.fakeBody, {headers: {"Content-Type": "text/event-stream"}}));
};"""


def event(body):
    return "data: " + json.dumps(body) + "\n\n"


def chunk(text=None, finish=None):
    return event({"choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]})


def open_page(server, browser, body=None):
    browser.get(server.url + "/")
    WebDriverWait(browser, WAIT).until(lambda b: "ckpt" in b.find_element(By.ID, "model-name").text)
    browser.execute_script(FAKE + ("" if body is None else "window.fakeBody = arguments[0];"), body)


def idle(browser):
    WebDriverWait(browser, WAIT, poll_frequency=0.2).until(
        lambda b: b.find_element(By.ID, "prompt").get_attribute("disabled") is None)


def errors(browser):
    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".message.error")]


def test_settings_reach_the_request_as_written_and_a_bad_one_is_refused(server, browser):
    """max tokens "1e3" was sent as 1, "2.5" as 2; a field that is not a number ("1e") sent the default."""
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
    set_field(browser, "temperature", "1e")
    browser.find_element(By.ID, "prompt").send_keys("Again\n")
    WebDriverWait(browser, WAIT).until(errors)
    assert errors(browser) == ["Error: temperature is not a number"]
    assert len(browser.execute_script("return window.sent;")) == 1
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Again"


def test_an_error_after_some_text_keeps_the_text(server, browser):
    """An error event mid-reply (the server closing) removed the text streamed so far; it stays, marked."""
    closed = {"error": {"message": "the server closed before this reply was complete", "type": "server_error"}}
    open_page(server, browser, chunk("Half a ") + chunk("reply") + event(closed))
    browser.find_element(By.ID, "prompt").send_keys("Hello?\n")
    idle(browser)
    reply = replies(browser)[0]
    assert (reply.get_attribute("data-state"), reply.text) == (
        "incomplete", "Half a reply\nincomplete: the server closed before this reply was complete")
    browser.execute_script("window.fakeBody = arguments[0];", chunk("Fine.", "stop"))
    browser.find_element(By.ID, "prompt").send_keys("Go on.\n")
    idle(browser)
    assert browser.execute_script("return window.sent;")[1]["messages"][1] == {
        "role": "assistant", "content": "Half a reply"}


def test_a_server_that_cannot_be_reached_is_named(server, browser):  # was "Failed to fetch" alone
    open_page(server, browser)
    browser.execute_script("window.fakeBody = null;")
    browser.find_element(By.ID, "prompt").send_keys("Hello?\n")
    WebDriverWait(browser, WAIT).until(errors)
    assert errors(browser) == ["Error: the server cannot be reached (Failed to fetch)"]
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Hello?"


def test_reload_keeps_the_conversation_draft_and_settings_and_rtl_reads_rtl(server, browser):
    """A reload lost the conversation, the box's text and the settings; Arabic was laid out LTR ("!" right)."""
    open_page(server, browser, chunk("<b>x</b>", "stop"))
    set_field(browser, "max-tokens", "7")
    browser.find_element(By.ID, "prompt").send_keys("مرحبا بالعالم!\n")
    idle(browser)
    browser.find_element(By.ID, "prompt").send_keys("<i>draft")
    before = browser.find_element(By.ID, "messages").get_attribute("innerHTML")
    browser.refresh()
    browser.execute_script(FAKE + "window.fakeBody = arguments[0];", chunk("y", "stop"))
    assert browser.find_element(By.ID, "messages").get_attribute("innerHTML") == before
    assert [browser.find_element(By.ID, i).get_attribute("value") for i in ("prompt", "max-tokens")] == [
        "<i>draft", "7"]
    assert browser.execute_script("""const t = document.querySelector('.message.user .content').firstChild;
        const x = i => { const r = new Range(); r.setStart(t, i); r.setEnd(t, i + 1); return r.getBoundingClientRect().x; };
        return x(13) < x(0);""")  # "!" left of the first letter
    browser.find_element(By.ID, "prompt").send_keys("\n")
    idle(browser)
    assert browser.execute_script("return window.sent;")[0]["messages"] == [
        {"role": "user", "content": "مرحبا بالعالم!"}, {"role": "assistant", "content": "<b>x</b>"},
        {"role": "user", "content": "<i>draft"}]
    open_page(server, browser)  # opened anew: a new chat
    assert not browser.find_elements(By.CSS_SELECTOR, ".message")
