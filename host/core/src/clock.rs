//! Wall-clock time as pde writes it everywhere: RFC 3339, UTC.

/// The current time as RFC 3339 UTC, e.g. `2026-11-29T04:58:12.123456Z`.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00Z"))
}

/// The current time as seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// `secs` since the Unix epoch as RFC 3339 UTC, e.g. `2026-11-29T04:58:12Z`.
pub fn rfc3339_from_unix(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| String::from("1970-01-01T00:00:00Z"))
}

/// An RFC 3339 time cut to whole seconds (`2026-11-29T14:02:11.123Z` →
/// `2026-11-29T14:02:11Z`): times are kept with nanoseconds, trailing zeros
/// dropped, which makes columns ragged; whole seconds also order as text.
pub fn whole_seconds(ts: &str) -> String {
    match (ts.find('.'), ts.find('T')) {
        (Some(dot), Some(t)) if dot > t => {
            let zone = ts[dot..]
                .find(['Z', '+', '-'])
                .map(|i| &ts[dot + i..])
                .unwrap_or("");
            format!("{}{zone}", &ts[..dot])
        }
        _ => ts.to_string(),
    }
}
