"""Draw docs/world.png: reference | blurred reference (CDNS) | target, with the prompts, for a few subjects.

    python docs/world_figure.py
"""
import numpy as np
from PIL import Image, ImageDraw

from pipeline import degrade, world

rng = np.random.default_rng(3)
scale, rows = 4, []
for _ in range(6):
    s, c = world.sample_subject(rng), world.sample_context(rng)
    ref = world.render(s, c, 32, reference=True)[0]
    cells = [ref, degrade.blur(ref, 2.0), world.render(s, c, 32)[0]]
    row = Image.fromarray(np.concatenate(cells, 1)).resize((96 * scale, 32 * scale), Image.NEAREST)
    canvas = Image.new("RGB", (96 * scale + 520, 32 * scale), "white")
    canvas.paste(row, (0, 0))
    d = ImageDraw.Draw(canvas)
    d.text((96 * scale + 10, 30), f"prompt:  {world.prompt(s, c)}", fill="black")
    d.text((96 * scale + 10, 50), f"generic: {world.generic_prompt(s)}", fill="gray")
    d.text((96 * scale + 10, 70), f"identity: {world.caption(s)}", fill="gray")
    rows.append(canvas)
out = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
for i, r in enumerate(rows):
    out.paste(r, (0, i * r.height))
out.save("docs/world.png")
