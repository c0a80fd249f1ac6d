//! The balloon device as the user asks for it: `--balloon`'s value (the
//! API's `PUT /balloon` is in [`crate::api::balloon`]).

use devices::virtio::balloon::BalloonConfig;

/// Parses `--balloon`'s `amount_mib=N,deflate_on_oom=on|off,
/// free_page_reporting=on|off,stats_interval_s=N` (any subset, any
/// order; `true`/`false` work as `on`/`off`).
pub fn parse_option(s: &str) -> Result<BalloonConfig, String> {
    let mut c = BalloonConfig::default();
    for opt in s.split(',').filter(|o| !o.is_empty()) {
        let (key, value) = opt
            .split_once('=')
            .ok_or_else(|| format!("invalid balloon option '{opt}' (expected KEY=VALUE)"))?;
        match key {
            "amount_mib" => {
                c.amount_mib = value
                    .parse()
                    .map_err(|_| format!("invalid balloon amount_mib '{value}'"))?
            }
            "stats_interval_s" | "stats_polling_interval_s" => {
                c.stats_interval_s = value.parse().map_err(|_| {
                    format!("invalid balloon stats_interval_s '{value}' (0 to 65535)")
                })?
            }
            "deflate_on_oom" => c.deflate_on_oom = on_off(key, value)?,
            "free_page_reporting" => c.free_page_reporting = on_off(key, value)?,
            _ => {
                return Err(format!(
                    "unknown balloon option '{key}' (expected amount_mib, deflate_on_oom, \
                     free_page_reporting, stats_interval_s)"
                ))
            }
        }
    }
    Ok(c)
}

fn on_off(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!(
            "invalid balloon {key} '{value}' (expected on or off)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let c = parse_option(
            "amount_mib=64,deflate_on_oom=on,free_page_reporting=true,stats_interval_s=2",
        )
        .unwrap();
        assert_eq!(
            c,
            BalloonConfig {
                amount_mib: 64,
                deflate_on_oom: true,
                stats_interval_s: 2,
                free_page_reporting: true,
            }
        );
        assert_eq!(parse_option("").unwrap(), BalloonConfig::default());
        for bad in [
            "amount_mib=-1",
            "amount_mib",
            "stats_interval_s=70000",
            "deflate_on_oom=yes",
            "free_page_hinting=on",
        ] {
            assert!(parse_option(bad).is_err(), "{bad} accepted");
        }
    }
}
