//! `application/x-www-form-urlencoded` text (query strings and form bodies), decoded the way
//! Node's parsers do closely enough for tokens and `echo` values.

/// Every `key=value` pair of `text`, percent-decoded (`+` is a space), in order.
pub(crate) fn pairs(text: &str) -> impl Iterator<Item = (String, String)> + '_ {
    text.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k), percent_decode(v))
    })
}

/// The first value of `name` in a query string.
pub(crate) fn param(query: &str, name: &str) -> Option<String> {
    pairs(query).find_map(|(k, v)| (k == name).then_some(v))
}

/// The value of `name` if it occurs exactly once: Express's `qs` makes a repeated key an
/// array, which NapCat's `typeof x === 'string'` checks then ignore.
pub(crate) fn single_param(query: &str, name: &str) -> Option<String> {
    let mut found = pairs(query).filter(|(k, _)| k == name).map(|(_, v)| v);
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// Percent-decode `s` (`+` is a space); invalid escapes stay as they are.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_finds_params() {
        assert_eq!(
            param("a=1&access_token=x%20y+z", "access_token").as_deref(),
            Some("x y z")
        );
        assert_eq!(param("a=1", "b"), None);
        assert_eq!(single_param("t=1&t=2", "t"), None);
        assert_eq!(single_param("t=1&u=2", "t").as_deref(), Some("1"));
        assert_eq!(percent_decode("%E4%BD%A0%zz%"), "你%zz%");
    }
}
