"""The web page at `/`, driven in a real browser: Playwright with Debian's Chromium (never a
browser download), against `sdlab serve` with the bundled model at 64 px and a few steps.

Each test checks, on the way out, that the page asked for nothing outside 127.0.0.1 and logged
no console error. Set SDLAB_WEB_UI_SCREENSHOTS=docs to refresh docs/web-ui-*.png.
"""

from __future__ import annotations

import base64
import io
import os
import re
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image, ImageFilter, PngImagePlugin

from server_helpers import running_server

try:
    from playwright import sync_api
    from playwright.sync_api import expect
except ImportError:  # the tests fail, never skip: a browser test that skips in CI tests nothing
    sync_api = expect = None

CHROMIUM = "/usr/bin/chromium"

LABELS = ["Prompt", "Negative prompt", "Sampler", "Steps", "CFG scale", "Seed", "Width", "Height", "Batch size"]
FEW_STEPS = "6"
JOB_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def server_url():
    with running_server() as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if sync_api is None:
        pytest.fail("the web page's tests need Playwright: run ./scripts/test.sh, or pip install -e '.[dev]'")
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"the web page's tests need Debian's Chromium at {CHROMIUM}: run ./scripts/test.sh as root, "
                    "or apt-get install chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def is_local(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in ("data", "blob") or parsed.hostname == "127.0.0.1"


def open_page(browser, server_url, width=1280, height=800):
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.outside_requests, page.console_errors = [], []
    page.on("request", lambda request: None if is_local(request.url) else page.outside_requests.append(request.url))
    page.on("console", lambda message: page.console_errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: page.console_errors.append(str(error)))
    page.goto(server_url + "/")
    # the menus are filled from the API once the page has loaded
    page.wait_for_function("document.getElementById('sampler').options.length > 1")
    return page


@pytest.fixture
def page(browser, server_url):
    page = open_page(browser, server_url)
    yield page
    page.context.close()
    assert page.outside_requests == [], "the page must ask for nothing outside 127.0.0.1"
    assert page.console_errors == [], "the page must log no console error"


def open_advanced(page):
    page.locator("summary", has_text="Advanced").click()
    expect(page.get_by_label("Negative prompt")).to_be_visible()


def generate(page):
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_have_text(re.compile(r"^Done"), timeout=JOB_TIMEOUT_MS)


def picture_pixels(page, selector="#picture") -> np.ndarray:
    source = page.eval_on_selector(selector, "image => image.src")
    assert source.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def record_progress(page):
    """Collects every value the progress bar shows, however fast the job runs."""
    page.evaluate("""() => {
        window.progressSeen = [];
        const bar = document.getElementById('progress');
        new MutationObserver(() => window.progressSeen.push(bar.value))
            .observe(bar, {attributes: true, attributeFilter: ['value']});
    }""")


def test_every_control_has_its_label_and_the_progress_bar_its_role(page):
    open_advanced(page)
    for word in LABELS:
        expect(page.get_by_label(word, exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    expect(page.get_by_role("button", name="Interrupt")).to_be_disabled()
    expect(page.get_by_role("progressbar")).to_have_count(1)
    expect(page.get_by_role("button", name="Random seed")).to_be_visible()
    expect(page.get_by_role("button", name="Re-use seed")).to_be_visible()
    for label in ["Model", "Hires fix", "LoRA", "Schedule type"]:
        expect(page.get_by_label(label, exact=True)).to_have_count(1)


def test_typing_a_prompt_and_generating_shows_progress_then_the_picture(page):
    expect(page.get_by_label("Negative prompt")).to_be_hidden()  # the page opens simple
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Size", exact=True).select_option("64x64")
    record_progress(page)
    generate(page)
    seen = page.evaluate("window.progressSeen")
    assert any(0 < value < 1 for value in seen), f"the progress bar moved through the steps: {seen}"
    expect(page.get_by_role("progressbar")).to_have_attribute("value", "1")
    assert picture_pixels(page).shape == (64, 64, 3)
    expect(page.get_by_role("list", name="Gallery").get_by_role("button")).to_have_count(1)
    expect(page.locator("#infotext")).to_contain_text("a red circle")
    expect(page.locator("#infotext")).to_contain_text("Size: 64x64")


def test_keyboard_alone_opens_advanced_and_generates(page):
    page.get_by_label("Prompt", exact=True).focus()
    page.keyboard.type("a blue square")
    page.keyboard.press("Tab")
    page.keyboard.press("ArrowDown")  # the Size menu's next entry: 64 x 64
    expect(page.get_by_label("Size", exact=True)).to_have_value("64x64")
    page.locator("summary", has_text="Advanced").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#advanced")).to_have_attribute("open", "")
    page.get_by_label("Steps", exact=True).fill(FEW_STEPS)
    page.get_by_role("button", name="Generate").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_have_text(re.compile(r"^Done"), timeout=JOB_TIMEOUT_MS)


def test_advanced_sampler_and_seed_reach_the_picture_and_seed_buttons_work(page):
    open_advanced(page)
    page.get_by_label("Prompt", exact=True).fill("a green triangle")
    page.get_by_label("Sampler", exact=True).select_option("DPM++ 2M")
    page.get_by_label("Seed", exact=True).fill("1234")
    page.get_by_label("Steps", exact=True).fill(FEW_STEPS)
    page.get_by_label("Size", exact=True).select_option("64x64")
    expect(page.get_by_label("Width", exact=True)).to_have_value("64")
    page.get_by_label("Self-attention scale", exact=True).fill("2")
    generate(page)
    infotext = page.locator("#infotext")
    expect(infotext).to_contain_text("Self-attention scale: 2")
    expect(infotext).to_contain_text("Sampler: DPM++ 2M")
    expect(infotext).to_contain_text("Seed: 1234")
    first = picture_pixels(page)

    page.get_by_role("button", name="Random seed").click()
    expect(page.get_by_label("Seed", exact=True)).to_have_value("-1")
    page.get_by_role("button", name="Re-use seed").click()
    expect(page.get_by_label("Seed", exact=True)).to_have_value("1234")
    generate(page)
    assert np.array_equal(picture_pixels(page), first), "the same seed and settings give the same picture"


def test_interrupt_ends_the_job_and_the_page_is_ready_again(page):
    open_advanced(page)
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Steps", exact=True).fill("150")
    page.get_by_label("Size", exact=True).select_option("64x64")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_have_text(re.compile(r"^Step"), timeout=JOB_TIMEOUT_MS)
    page.get_by_role("button", name="Interrupt").click()
    expect(page.locator("#status")).not_to_have_text(re.compile(r"^(Step|Interrupting)"), timeout=JOB_TIMEOUT_MS)
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    expect(page.get_by_role("button", name="Interrupt")).to_be_disabled()


def paint_band(page, top: float, bottom: float, left: float, right: float):
    """Drags the mouse across the mask canvas in rows, filling the box given in fractions of it."""
    canvas = page.locator("#mask-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    for fraction in np.linspace(top, bottom, 6):
        y = box["y"] + fraction * box["height"]
        page.mouse.move(box["x"] + left * box["width"], y)
        page.mouse.down()
        page.mouse.move(box["x"] + right * box["width"], y, steps=8)
        page.mouse.up()


def painted_mask(page) -> np.ndarray:
    alpha = page.evaluate("""() => {
        const canvas = document.getElementById('mask-canvas');
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        return {width: canvas.width, height: canvas.height, alpha: Array.from(data.filter((_, i) => i % 4 === 3))};
    }""")
    return np.array(alpha["alpha"], dtype=np.uint8).reshape(alpha["height"], alpha["width"])


def test_inpaint_repaints_only_the_painted_part(page):
    open_advanced(page)
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Steps", exact=True).fill(FEW_STEPS)
    page.get_by_label("Seed", exact=True).fill("7")
    page.get_by_label("Size", exact=True).select_option("64x64")
    generate(page)

    page.get_by_role("button", name="Send to inpaint").click()
    expect(page.get_by_role("radio", name="Inpaint")).to_be_checked()
    page.wait_for_function("document.getElementById('mask-canvas').width === 64")
    brush = page.get_by_label("Brush size")
    brush.focus()
    for _ in range(4):
        page.keyboard.press("ArrowRight")
    strength = page.get_by_label(re.compile("^Denoising strength"))
    strength.focus()
    page.keyboard.press("End")  # strength 1: the painted part is drawn anew
    page.get_by_label("Mask blur").fill("1")  # a Gaussian's sigma in px: a short tail past the mask's edge
    paint_band(page, top=0.35, bottom=0.65, left=0.3, right=0.7)
    mask = painted_mask(page)
    assert 0.05 < (mask > 0).mean() < 0.4, "the mask covers the middle band only"

    source = picture_pixels(page, "#source-image")
    page.get_by_label("Prompt", exact=True).fill("a blue square")
    generate(page)
    result = picture_pixels(page)
    assert result.shape == source.shape
    blur = int(page.get_by_label("Mask blur").input_value())
    reach = 2 * (3 * blur + 1) + 1  # a window reaching 3 sigma (and a pixel) past the painted edge
    near_mask = np.asarray(Image.fromarray((mask > 0).astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(reach)))
    difference = np.abs(result - source).max(axis=2)
    assert difference[near_mask == 0].max() <= 2, "pixels away from the mask stay as they were"
    assert difference[mask > 200].mean() > 8, "the painted part was repainted"


def png_with_parameters(parameters: str) -> str:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buffer, "PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def test_dropping_a_png_reads_its_parameters_into_the_form(page):
    parameters = ("a yellow star next to a purple circle\nNegative prompt: blurry, dark\n"
                  "Steps: 13, Sampler: DPM++ 2M, CFG scale: 5.5, Seed: 4242, Size: 96x64, Self-attention scale: 2")
    transfer = page.evaluate_handle("""([data, name]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: 'image/png'}));
        return transfer;
    }""", [png_with_parameters(parameters), "shapes.png"])
    page.dispatch_event("main", "dragenter", {"dataTransfer": transfer})
    expect(page.locator("#drop-hint")).to_be_visible()
    page.dispatch_event("main", "drop", {"dataTransfer": transfer})
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a yellow star next to a purple circle")
    expect(page.locator("#drop-hint")).to_be_hidden()
    expect(page.get_by_label("Negative prompt")).to_have_value("blurry, dark")
    expect(page.get_by_label("Steps", exact=True)).to_have_value("13")
    expect(page.get_by_label("Sampler", exact=True)).to_have_value("DPM++ 2M")
    expect(page.get_by_label("CFG scale", exact=True)).to_have_value("5.5")
    expect(page.get_by_label("Seed", exact=True)).to_have_value("4242")
    expect(page.get_by_label("Width", exact=True)).to_have_value("96")
    expect(page.get_by_label("Height", exact=True)).to_have_value("64")
    expect(page.get_by_label("Self-attention scale", exact=True)).to_have_value("2")


def save_screenshots(page, tmp_path, name, full_page=False, every_path=False):
    paths = [tmp_path / name]
    folder = os.environ.get("SDLAB_WEB_UI_SCREENSHOTS")
    if folder:
        paths.append(os.path.join(folder, name))
    for path in paths:
        page.screenshot(path=str(path), full_page=full_page)
    return paths if every_path else paths[0]


def test_screenshots_simple_and_advanced_and_a_narrow_window(browser, server_url, tmp_path):
    page = open_page(browser, server_url)
    page.get_by_label("Prompt", exact=True).fill("a red circle above a blue square")
    page.get_by_label("Size", exact=True).select_option("64x64")
    generate(page)
    simple = save_screenshots(page, tmp_path, "web-ui-simple.png")
    open_advanced(page)
    page.get_by_label("Negative prompt").fill("blurry")
    page.get_by_label("Negative prompt").blur()
    advanced = save_screenshots(page, tmp_path, "web-ui-advanced.png")
    for path in (simple, advanced):
        assert Image.open(path).size == (1280, 800)
    page.context.close()

    narrow = open_page(browser, server_url, width=400, height=800)
    open_advanced(narrow)
    assert narrow.evaluate("document.documentElement.scrollWidth") <= 400, "nothing overflows a 400 px window"
    narrow.screenshot(path=str(tmp_path / "web-ui-narrow.png"), full_page=True)
    narrow.context.close()
    assert page.outside_requests == narrow.outside_requests == []
    assert page.console_errors == narrow.console_errors == []


def test_a_result_sent_to_img2img_outpaint_and_upscale_comes_back_at_the_right_size(page):
    open_advanced(page)
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Steps", exact=True).fill(FEW_STEPS)
    page.get_by_label("Size", exact=True).select_option("64x64")
    generate(page)
    expected = {"img2img": (64, 64, 3), "outpaint": (64, 96, 3), "upscale": (256, 256, 3)}
    for mode, shape in expected.items():
        page.get_by_role("list", name="Gallery").get_by_role("button").last.click()  # the first picture
        page.get_by_role("button", name=f"Send to {mode}").click()
        expect(page.get_by_role("radio", name=mode, exact=False)).to_be_checked()
        generate(page)
        assert picture_pixels(page).shape == shape, mode
    expect(page.get_by_role("list", name="Gallery").get_by_role("button")).to_have_count(4)


def test_inside_shows_the_steps_the_attention_maps_and_an_edit_of_the_picture(page, tmp_path):
    open_advanced(page)
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Sampler", exact=True).select_option("Euler")  # an edit needs a deterministic sampler
    page.get_by_label("Steps", exact=True).fill(FEW_STEPS)
    page.get_by_label("Size", exact=True).select_option("64x64")
    page.locator("summary", has_text="Advanced").click()  # closed again: the screenshot shows the output
    generate(page)
    picture = picture_pixels(page)
    inside = page.locator("summary", has_text="Inside")
    expect(page.get_by_role("button", name="Show denoising steps")).to_be_hidden()  # collapsed by default
    inside.focus()
    page.keyboard.press("Enter")  # one key away
    status = page.locator("#inside-status")

    page.get_by_role("button", name="Show denoising steps").focus()
    page.keyboard.press("Enter")
    expect(status).to_have_text("Done.", timeout=JOB_TIMEOUT_MS)
    predicted = page.get_by_role("list", name="Predicted clean pictures").get_by_role("img")
    expect(predicted).to_have_count(int(FEW_STEPS) + 1)  # every step of six, then the finished picture
    expect(predicted.last).to_have_attribute("alt", re.compile("done"))
    assert np.array_equal(picture_pixels(page, "ol[aria-label='Predicted clean pictures'] li:last-child img"), picture)
    page.get_by_role("button", name="Pause").click()
    expect(page.get_by_role("button", name="Play")).to_have_attribute("aria-pressed", "true")

    page.get_by_role("button", name="Attention maps").click()
    expect(status).to_have_text("Done.", timeout=JOB_TIMEOUT_MS)
    maps = page.get_by_role("list", name="Attention maps per word")
    expect(maps.locator("figcaption")).to_have_text(["a", "red", "circle"])
    expect(maps.get_by_role("img", name="Attention map of “red” over the picture")).to_be_visible()

    target = page.get_by_label("Target prompt")
    expect(target).to_have_value("a red circle")  # the picture's prompt, to change a word of
    target.fill("a blue circle")
    slider = page.get_by_label("Cross-attention steps")
    slider.focus()
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#edit-cross-value")).to_have_text("0.7")
    page.get_by_role("button", name="Edit prompt").click()
    expect(status).to_have_text("Done.", timeout=JOB_TIMEOUT_MS)
    pair = page.get_by_role("list", name="Source and edit side by side")
    expect(pair.locator("figcaption")).to_have_text(["source: a red circle", "edit: a blue circle"])
    source = picture_pixels(page, "ul[aria-label='Source and edit side by side'] li:first-child img")
    edit = picture_pixels(page, "ul[aria-label='Source and edit side by side'] li:last-child img")
    assert np.abs(source - picture).max() <= 2, "the edit's source is the selected picture, redrawn"
    assert not np.array_equal(source, edit)

    expect(predicted).to_have_count(int(FEW_STEPS) + 1)  # each view keeps its place: all three show at once
    for path in save_screenshots(page, tmp_path, "web-ui-inside.png", full_page=True, every_path=True):
        # the whole page is tall: 256 colours keep it small and lose nothing a reader sees
        Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        assert os.path.getsize(path) < 200_000
