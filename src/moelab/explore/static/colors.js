// Expert colours: up to 64 distinguishable backgrounds. Hues step by the golden angle so that neighbouring
// ids differ most; four lightness bands (one per block of 16 ids) separate ids whose hues come close.
// Text is black or white, whichever contrasts more with the background (WCAG relative luminance).
"use strict";

// Experts 0-15 (most models' whole set): Kelly's colours of maximum contrast, picked greedily for the largest
// smallest CIEDE2000 difference (15.6; the golden-angle hues had 3 pairs under 5, the just-noticeable range).
const PALETTE_16 = ["#F3C300", "#604E97", "#008856", "#A1CAF1", "#E25822", "#E68FAC", "#654522", "#848482",
                    "#2B3D26", "#8DB600", "#B3446C", "#0067A5", "#C2B280", "#F99379", "#F38400", "#882D17"];

function expertColor(e) {
  if (Number.isInteger(e) && e >= 0 && e < PALETTE_16.length) {
    const hex = PALETTE_16[e];
    const [r, g, b] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16) / 255);
    return { bg: hex, fg: contrastText(r, g, b) };
  }
  const hue = (e * 137.508) % 360;
  const light = [78, 58, 88, 68][Math.floor(e / 16) % 4];
  const sat = e % 2 ? 70 : 55;
  return { bg: `hsl(${hue.toFixed(1)} ${sat}% ${light}%)`, fg: textOn(hue, sat / 100, light / 100) };
}

function textOn(h, s, l) {
  // HSL -> sRGB -> relative luminance; contrast against black vs white.
  const a = s * Math.min(l, 1 - l);
  const f = (n) => { const k = (n + h / 30) % 12; return l - a * Math.max(-1, Math.min(k - 3, 9 - k, 1)); };
  return contrastText(f(0), f(8), f(4));
}

function contrastText(r, g, b) {
  const lin = (c) => (c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4));
  const L = 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b);
  return (L + 0.05) / 0.05 >= 1.05 / (L + 0.05) ? "#000" : "#fff";
}
