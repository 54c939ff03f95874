"""PIL/libjpeg JPEG rate-distortion curve on a folder (the field's JPEG baseline: 4:2:0, standard
Huffman tables, PIL defaults). Writes JSON: per quality, mean bpp (file bytes incl. headers) and
mean PSNR (RGB, peak 255) over the images. psic's 4:2:0 baseline (`psic::baseline`) is checked
against this file by `cargo test --release --lib baseline` (when the Kodak folder is present).

    pip install pillow numpy
    python3 scripts/pil_jpeg_curve.py ../shared/data/kodak docs/reports/pil-jpeg-kodak.json
"""
import io, json, math, os, sys

import numpy as np
from PIL import Image, __version__ as pil_version

QUALITIES = [5, 10, 15, 20, 30, 40, 50, 60, 75, 90]


def main(folder, out):
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".png", ".jpg", ".jpeg")))
    curve = []
    for q in QUALITIES:
        bpps, psnrs = [], []
        for n in names:
            img = Image.open(os.path.join(folder, n)).convert("RGB")
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=q)  # PIL default: 4:2:0, no optimize
            data = buf.getvalue()
            dec = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
            ref = np.asarray(img, dtype=np.float64)
            mse = np.mean((dec - ref) ** 2)
            bpps.append(8 * len(data) / (img.width * img.height))
            psnrs.append(10 * math.log10(255 * 255 / mse))
        curve.append({"quality": q, "bpp": float(np.mean(bpps)), "psnr": float(np.mean(psnrs))})
    json.dump({"tool": f"PIL {pil_version}", "subsampling": "4:2:0", "images": len(names),
               "curve": curve}, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
