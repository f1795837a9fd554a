// Expert colours: up to 64 distinguishable backgrounds. Hues step by the golden angle so that neighbouring
// ids differ most; four lightness bands (one per block of 16 ids) separate ids whose hues come close.
// Text is black or white, whichever contrasts more with the background (WCAG relative luminance).
"use strict";

function expertColor(e) {
  const hue = (e * 137.508) % 360;
  const light = [78, 58, 88, 68][Math.floor(e / 16) % 4];
  const sat = e % 2 ? 70 : 55;
  return { bg: `hsl(${hue.toFixed(1)} ${sat}% ${light}%)`, fg: textOn(hue, sat / 100, light / 100) };
}

function textOn(h, s, l) {
  // HSL -> sRGB -> relative luminance; contrast against black vs white.
  const a = s * Math.min(l, 1 - l);
  const f = (n) => { const k = (n + h / 30) % 12; return l - a * Math.max(-1, Math.min(k - 3, 9 - k, 1)); };
  const lin = (c) => (c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4));
  const L = 0.2126 * lin(f(0)) + 0.7152 * lin(f(8)) + 0.0722 * lin(f(4));
  return (L + 0.05) / 0.05 >= 1.05 / (L + 0.05) ? "#000" : "#fff";
}
