// The inpainting mask, painted in the browser over the source image.
// The canvas has the image's own pixel size (CSS scales it on screen); paint is kept in the alpha
// channel, so the exported mask is white where painted and black elsewhere, as the API expects.

const PAINT = "rgb(242, 169, 59)";

export function createMaskPainter(canvas, { brushSize, eraser }) {
  const context = canvas.getContext("2d", { willReadFrequently: true });
  let last = null;

  function toCanvas(event) {
    const box = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) / box.width) * canvas.width,
      y: ((event.clientY - box.top) / box.height) * canvas.height,
    };
  }

  function strokeTo(point) {
    context.globalCompositeOperation = eraser.checked ? "destination-out" : "source-over";
    context.strokeStyle = context.fillStyle = PAINT;
    context.lineWidth = Number(brushSize.value);
    context.lineCap = context.lineJoin = "round";
    context.beginPath();
    if (last) {
      context.moveTo(last.x, last.y);
      context.lineTo(point.x, point.y);
      context.stroke();
    } else {
      context.arc(point.x, point.y, context.lineWidth / 2, 0, 2 * Math.PI);
      context.fill();
    }
    last = point;
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    canvas.setPointerCapture(event.pointerId);
    last = null;
    strokeTo(toCanvas(event));
  });
  canvas.addEventListener("pointermove", (event) => {
    if (canvas.hasPointerCapture(event.pointerId)) strokeTo(toCanvas(event));
  });
  const stop = () => {
    last = null;
  };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);

  function mapAlpha(change) {
    const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
    const data = pixels.data;
    for (let i = 0; i < data.length; i += 4) {
      data[i] = 242;
      data[i + 1] = 169;
      data[i + 2] = 59;
      data[i + 3] = change(data[i + 3]);
    }
    context.putImageData(pixels, 0, 0);
  }

  return {
    // A new, empty mask the size of the image; the brush defaults to a tenth of the longer side.
    reset(width, height) {
      canvas.width = width;
      canvas.height = height;
      const longer = Math.max(width, height);
      brushSize.max = String(Math.max(8, Math.round(longer / 2)));
      brushSize.value = String(Math.max(2, Math.round(longer / 10)));
    },
    clear() {
      context.clearRect(0, 0, canvas.width, canvas.height);
    },
    invert() {
      mapAlpha((alpha) => 255 - alpha);
    },
    isEmpty() {
      const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
      for (let i = 3; i < data.length; i += 4) if (data[i] > 0) return false;
      return true;
    },
    // The mask as a base64 PNG: grey level = how much of the pixel was painted.
    toBase64() {
      const out = document.createElement("canvas");
      out.width = canvas.width;
      out.height = canvas.height;
      const outContext = out.getContext("2d");
      const source = context.getImageData(0, 0, canvas.width, canvas.height).data;
      const pixels = outContext.createImageData(canvas.width, canvas.height);
      for (let i = 0; i < source.length; i += 4) {
        pixels.data[i] = pixels.data[i + 1] = pixels.data[i + 2] = source[i + 3];
        pixels.data[i + 3] = 255;
      }
      outContext.putImageData(pixels, 0, 0);
      return out.toDataURL("image/png").split(",")[1];
    },
  };
}
