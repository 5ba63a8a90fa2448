//! Readable contrast (WCAG 2.1 AA) of the stylesheet every page and the
//! report embed: the CSS is parsed, each text colour is paired with each
//! background it can sit on, and every pair must reach 4.5:1 (1.4.3, text);
//! outlines and borders must reach 3:1 against those backgrounds (1.4.11,
//! focus indicators and other non-text parts), and so must the timeline's
//! bars against the page.
//!
//! Which colour sits on which background is decided conservatively: the
//! stylesheet has two scopes, the dark `header` (rules whose selector starts
//! with `header`) and the page (every other rule), and within a scope every
//! colour is checked against every background, whether or not a page puts
//! them together today, so a new template cannot make an unchecked pair.

use simplecss::StyleSheet;

/// The stylesheet askama includes in every page and in the report.
const CSS: &str = include_str!("../templates/console.css");

/// WCAG 2.1 1.4.3 (AA), normal text.
const TEXT: f64 = 4.5;
/// WCAG 2.1 1.4.11 (AA), user-interface components and graphics.
const NON_TEXT: f64 = 3.0;

/// An opaque sRGB colour, each channel 0 to 1.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rgb([f64; 3]);

/// `#rgb` or `#rrggbb`. The sheet writes every colour so (a keyword or a
/// function is refused by [`declared`], so that none goes unchecked).
fn hex(token: &str) -> Option<Rgb> {
    let h = token.strip_prefix('#')?;
    let full: String = match h.len() {
        3 => h.chars().flat_map(|c| [c, c]).collect(),
        6 => h.to_string(),
        _ => return None,
    };
    let mut rgb = [0.0; 3];
    for (i, c) in rgb.iter_mut().enumerate() {
        *c = f64::from(u8::from_str_radix(full.get(2 * i..2 * i + 2)?, 16).ok()?) / 255.0;
    }
    Some(Rgb(rgb))
}

/// WCAG 2.1 relative luminance.
fn luminance(c: &Rgb) -> f64 {
    let lin = |v: f64| {
        if v <= 0.04045 {
            v / 12.92
        } else {
            ((v + 0.055) / 1.055).powf(2.4)
        }
    };
    0.2126 * lin(c.0[0]) + 0.7152 * lin(c.0[1]) + 0.0722 * lin(c.0[2])
}

/// WCAG 2.1 contrast ratio, 1 to 21.
fn ratio(a: &Rgb, b: &Rgb) -> f64 {
    let (la, lb) = (luminance(a), luminance(b));
    (la.max(lb) + 0.05) / (la.min(lb) + 0.05)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Header,
    Page,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Text,
    NonText,
    Background,
}

/// One colour declared in the stylesheet.
#[derive(Debug, Clone)]
struct Declared {
    scope: Scope,
    role: Role,
    /// `selector { property: value }`, for the failure message.
    source: String,
    literal: String,
    colour: Rgb,
}

/// Every colour of `css`, with the scope and role of its declaration.
fn declared(css: &str) -> Result<Vec<Declared>, String> {
    let sheet = StyleSheet::parse(css);
    let mut out = Vec::new();
    for rule in &sheet.rules {
        let selector = rule.selector.to_string();
        let scope = if selector.starts_with("header") {
            Scope::Header
        } else {
            Scope::Page
        };
        for d in &rule.declarations {
            let role = match d.name {
                "color" | "fill" => Role::Text,
                "background" | "background-color" => Role::Background,
                "outline" | "outline-color" | "border" | "border-color" | "stroke" => Role::NonText,
                _ => continue,
            };
            for token in d.value.split_whitespace() {
                if token.starts_with('#') {
                    let colour = hex(token).ok_or_else(|| {
                        format!(
                            "{selector} {{ {}: {} }}: {token} is not a colour",
                            d.name, d.value
                        )
                    })?;
                    out.push(Declared {
                        scope,
                        role,
                        source: format!("{selector} {{ {}: {} }}", d.name, d.value),
                        literal: token.to_lowercase(),
                        colour,
                    });
                    continue;
                }
                // Lengths, styles and `none` are not colours; anything else
                // (a named colour, rgb(), currentColor) is refused rather
                // than skipped, so no colour goes unchecked.
                let plain = token.starts_with(|c: char| c.is_ascii_digit() || c == '.' || c == '-')
                    || matches!(
                        token,
                        "none"
                            | "solid"
                            | "dashed"
                            | "dotted"
                            | "double"
                            | "inherit"
                            | "transparent"
                    );
                if !plain {
                    return Err(format!(
                        "{selector} {{ {}: {} }}: write colours as #rgb or #rrggbb so this \
                         test can judge {token}",
                        d.name, d.value
                    ));
                }
            }
        }
    }
    // A rule the parser could not read would drop its colours unchecked:
    // every hex colour written in the sheet must have been seen.
    let seen: Vec<&str> = out.iter().map(|d| d.literal.as_str()).collect();
    for (i, _) in css.match_indices('#') {
        let hex: String = css[i + 1..]
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .collect();
        if matches!(hex.len(), 3 | 6) {
            let literal = format!("#{}", hex.to_lowercase());
            if !seen.contains(&literal.as_str()) {
                return Err(format!(
                    "{literal} is in the stylesheet but in no rule the parser read"
                ));
            }
        }
    }
    Ok(out)
}

/// Every pair of `css` below its threshold, in words.
fn failures(css: &str) -> Result<Vec<String>, String> {
    let colours = declared(css)?;
    let mut out = Vec::new();
    for scope in [Scope::Header, Scope::Page] {
        let of = |role| {
            colours
                .iter()
                .filter(move |d| d.scope == scope && d.role == role)
        };
        let backgrounds: Vec<&Declared> = of(Role::Background).collect();
        let foregrounds: Vec<&Declared> = of(Role::Text).chain(of(Role::NonText)).collect();
        if backgrounds.is_empty() && !foregrounds.is_empty() {
            out.push(format!(
                "{scope:?}: colours but no background to judge them on"
            ));
        }
        for fg in &foregrounds {
            let need = if fg.role == Role::Text {
                TEXT
            } else {
                NON_TEXT
            };
            for bg in &backgrounds {
                let r = ratio(&fg.colour, &bg.colour);
                if r < need {
                    out.push(format!(
                        "{:.2}:1 < {need}:1: {} on {}",
                        r, fg.source, bg.source
                    ));
                }
            }
        }
    }
    Ok(out)
}

#[test]
fn contrast_ratios_match_wcag_reference_values() {
    let c = |s: &str| hex(s).unwrap();
    assert!((ratio(&c("#000"), &c("#fff")) - 21.0).abs() < 1e-9);
    assert!((ratio(&c("#fff"), &c("#fff")) - 1.0).abs() < 1e-9);
    // #767676 is the lightest grey that passes on white (4.54:1).
    assert!(ratio(&c("#767676"), &c("#fff")) >= TEXT);
    assert!(ratio(&c("#777777"), &c("#fff")) < TEXT);
}

#[test]
fn a_pair_below_aa_is_found() {
    let css = "body { color: #111; background: #fff; }\n.hint { color: #777; }\n\
               header { background: #0b2545; color: #fff; }\nheader a:focus { outline: 3px solid #1d3557; }";
    let found = failures(css).unwrap();
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(
        found[0].contains("#1d3557") && found[0].contains("#0b2545"),
        "{found:#?}"
    );
    assert!(
        found[1].contains("hint") && found[1].contains("#777"),
        "{found:#?}"
    );
    assert!(failures("p { color: rgba(0, 0, 0, 0.5); background: #fff }").is_err());
    assert!(failures("p { color: grey; background: #fff }").is_err());
}

#[test]
fn every_colour_pair_of_the_console_stylesheet_is_readable() {
    let found = failures(CSS).unwrap();
    assert!(
        found.is_empty(),
        "pairs below WCAG AA:\n{}",
        found.join("\n")
    );
    assert!(
        declared(CSS).unwrap().len() > 10,
        "the sheet's colours were read"
    );
}

#[test]
fn the_timeline_bars_stand_out_from_the_page() {
    let page = hex("#fff").unwrap();
    for (what, fill) in crate::policy::BAR_FILLS {
        let r = ratio(&hex(fill).unwrap(), &page);
        assert!(r >= NON_TEXT, "{what} bars {fill}: {r:.2}:1 on white");
    }
}
