/*
 * ftvm built-in test guest: command line, boot banner and the main loop.
 *
 * Everything printed is a function of the command line, when the timer
 * interrupts arrive, the PIT and RTC values read and the bytes received on
 * COM1, so a VMM that replays those inputs reproduces the output exactly.
 */
#include "ftvm.h"

#define CMDLINE_MAX 4096
#define DEFAULT_SECONDS 3
#define DEFAULT_HZ 100
#define DEFAULT_LINES 10
#define HZ_MIN 19	/* PIT divisor must fit in 16 bits */
#define HZ_MAX 10000
#define SECONDS_MAX 1000000000ull
#define BURST_MAX 1000000000ull
#define SPIN_MAX 1000000000ull
#define SPINKB_DEFAULT 256
#define SPINKB_MIN 4
#define SPINKB_MAX 65536
#define KEY_PRINT_MAX 64
#define ECHO_MAX 64
#define READBACK_EVERY 10

struct config {
	u64 seconds;
	u64 hz;
	u64 lines;
	u64 burst;	/* 0: the normal timer-paced run */
	bool quiet;
	bool spin0_on, spin3_on;
	u64 spin0, spin3;	/* ticks to spin at CPL0 / CPL3 */
	u64 spinkb;		/* spin buffer, KiB: a power of two */
};

static char cmdline[CMDLINE_MAX];

static void print(const struct line *l)
{
	tx_line(l);
}

/* ---- command line -------------------------------------------------------- */

static bool is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static bool key_is(const char *k, u32 kn, const char *name)
{
	u32 i;

	for (i = 0; i < kn; i++)
		if (name[i] != k[i])
			return false;
	return name[kn] == '\0';
}

static bool parse_u64(const char *s, u32 n, u64 *out)
{
	u64 v = 0;
	u32 i;

	if (n == 0 || n > 19)
		return false;
	for (i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return false;
		v = v * 10 + (u64)(s[i] - '0');
	}
	*out = v;
	return true;
}

static void boot_note_key(const char *what, const char *k, u32 kn)
{
	struct line l;
	u32 i;

	line_reset(&l);
	line_str(&l, "[boot] ");
	line_str(&l, what);
	for (i = 0; i < kn && i < KEY_PRINT_MAX; i++)
		line_escaped(&l, (u8)k[i]);
	if (kn > KEY_PRINT_MAX)
		line_str(&l, "...");
	line_ch(&l, '\n');
	print(&l);
}

static void boot_note_clamp(const char *key, u64 given, u64 used)
{
	struct line l;

	line_reset(&l);
	line_str(&l, "[boot] ");
	line_str(&l, key);
	line_ch(&l, '=');
	line_dec(&l, given, 0);
	line_str(&l, " out of range, using ");
	line_dec(&l, used, 0);
	line_ch(&l, '\n');
	print(&l);
}

/*
 * Space-separated key=value options. Runs twice: silently before the
 * devices are set up, then again with `report` to print what it ignored.
 */
static void parse_cmdline(struct config *c, u64 mem_bytes, bool report)
{
	const char *p = cmdline;
	u64 kib;

	c->seconds = DEFAULT_SECONDS;
	c->hz = DEFAULT_HZ;
	c->lines = DEFAULT_LINES;
	c->burst = 0;
	c->quiet = false;
	c->spin0_on = false;
	c->spin3_on = false;
	c->spin0 = 0;
	c->spin3 = 0;
	c->spinkb = SPINKB_DEFAULT;

	for (;;) {
		const char *tok, *key, *val = NULL;
		u32 tn, kn, vn = 0;
		u64 v;

		while (*p && is_space(*p))
			p++;
		if (!*p)
			break;
		tok = p;
		while (*p && !is_space(*p))
			p++;
		tn = (u32)(p - tok);
		key = tok;
		for (kn = 0; kn < tn && key[kn] != '='; kn++)
			;
		if (kn < tn) {
			val = key + kn + 1;
			vn = tn - kn - 1;
		}

		if (key_is(key, kn, "seconds") || key_is(key, kn, "hz") ||
		    key_is(key, kn, "lines") || key_is(key, kn, "burst")) {
			if (!val || !parse_u64(val, vn, &v)) {
				if (report)
					boot_note_key("ignoring bad value for option ", key, kn);
				continue;
			}
			if (key[0] == 's')
				c->seconds = v;
			else if (key[0] == 'h')
				c->hz = v;
			else if (key[0] == 'b')
				c->burst = v;
			else
				c->lines = v;
		} else if (key_is(key, kn, "spin") || key_is(key, kn, "spin3") ||
			   key_is(key, kn, "spinkb")) {
			if (!val || !parse_u64(val, vn, &v)) {
				if (report)
					boot_note_key("ignoring bad value for option ", key, kn);
				continue;
			}
			if (kn == 4) {
				c->spin0_on = true;
				c->spin0 = v;
			} else if (key[4] == '3') {
				c->spin3_on = true;
				c->spin3 = v;
			} else {
				c->spinkb = v;
			}
		} else if (key_is(key, kn, "quiet")) {
			if (!val) {
				c->quiet = true;
			} else if (parse_u64(val, vn, &v)) {
				c->quiet = v != 0;
			} else if (report) {
				boot_note_key("ignoring bad value for option ", key, kn);
			}
		} else if (report) {
			if (kn)
				boot_note_key("ignoring unknown option ", key, kn);
			else
				boot_note_key("ignoring unknown option ", tok, tn);
		}
	}

	if (c->hz < HZ_MIN || c->hz > HZ_MAX) {
		u64 used = c->hz < HZ_MIN ? HZ_MIN : HZ_MAX;

		if (report)
			boot_note_clamp("hz", c->hz, used);
		c->hz = used;
	}
	if (c->lines > c->hz) {
		if (report)
			boot_note_clamp("lines", c->lines, c->hz);
		c->lines = c->hz;
	}
	if (c->seconds > SECONDS_MAX) {
		if (report)
			boot_note_clamp("seconds", c->seconds, SECONDS_MAX);
		c->seconds = SECONDS_MAX;
	}
	if (c->burst > BURST_MAX) {
		if (report)
			boot_note_clamp("burst", c->burst, BURST_MAX);
		c->burst = BURST_MAX;
	}
	if (c->spin0 > SPIN_MAX) {
		if (report)
			boot_note_clamp("spin", c->spin0, SPIN_MAX);
		c->spin0 = SPIN_MAX;
	}
	if (c->spin3 > SPIN_MAX) {
		if (report)
			boot_note_clamp("spin3", c->spin3, SPIN_MAX);
		c->spin3 = SPIN_MAX;
	}
	/* A power of two that fits in memory above the image. */
	kib = c->spinkb;
	if (kib > SPINKB_MAX)
		kib = SPINKB_MAX;
	if (kib > spin_buf_max_kib(mem_bytes))
		kib = spin_buf_max_kib(mem_bytes);
	if (kib < SPINKB_MIN)
		kib = SPINKB_MIN;
	while (kib & (kib - 1))
		kib &= kib - 1;
	if (kib != c->spinkb) {
		if (report && (c->spin0_on || c->spin3_on))
			boot_note_clamp("spinkb", c->spinkb, kib);
		c->spinkb = kib;
	}
}

/* ---- echo of received bytes ------------------------------------------- */

static u8 echo_buf[ECHO_MAX];
static u32 echo_n;
static bool echo_last_cr;	/* swallow the LF of a CR LF pair */
static bool echo_partial;	/* part of this input line already shown */

static void echo_emit(void)
{
	struct line l;
	u32 i;

	line_reset(&l);
	line_str(&l, "[echo] \"");
	for (i = 0; i < echo_n; i++)
		line_escaped(&l, echo_buf[i]);
	line_str(&l, "\"\n");
	print(&l);
	echo_n = 0;
}

static void echo_byte(u8 b)
{
	if (b == '\n' && echo_last_cr) {
		echo_last_cr = false;
		return;
	}
	echo_last_cr = b == '\r';
	if (b == '\r' || b == '\n') {
		if (echo_n || !echo_partial)
			echo_emit();
		echo_partial = false;
		return;
	}
	echo_buf[echo_n++] = b;
	if (echo_n == ECHO_MAX) {
		echo_emit();
		echo_partial = true;
	}
}

static void echo_flush_partial(void)
{
	if (echo_n) {
		echo_emit();
		echo_partial = true;
	}
}

static void rx_process(void)
{
	u8 buf[64];
	u64 overruns;
	u32 n, i;

	for (;;) {
		cli();
		n = rx_take(buf, sizeof(buf), &overruns);
		sti();
		if (overruns) {
			struct line l;

			line_reset(&l);
			line_str(&l, "[echo] (uart overrun x");
			line_dec(&l, overruns, 0);
			line_str(&l, ": bytes were lost before the guest read them)\n");
			print(&l);
		}
		if (!n)
			break;
		for (i = 0; i < n; i++)
			echo_byte(buf[i]);
	}
}

/* ---- periodic status line ---------------------------------------------- */

static u64 line_no;

static void status_line(void)
{
	struct line l;
	u64 t;
	u16 pit, rb_count = 0;
	u8 rb_status = 0;
	bool rb;
	u32 s;

	line_no++;
	rb = line_no % READBACK_EVERY == 0;

	cli();
	t = ticks;
	pit = pit_read();
	sum_u64(line_no);
	sum_u64(t);
	sum_u64(pit);
	if (rb) {
		pit_readback(&rb_status, &rb_count);
		sum_u64(rb_status);
		sum_u64(rb_count);
	}
	s = sum_get();
	sti();

	line_reset(&l);
	line_ch(&l, '[');
	line_dec(&l, line_no, 4);
	line_str(&l, "] ticks=");
	line_dec(&l, t, 0);
	line_str(&l, " pit=");
	line_dec(&l, pit, 0);
	line_str(&l, " sum=");
	line_hex(&l, s, 8);
	if (rb) {
		line_str(&l, " rb=");
		line_hex(&l, rb_status, 2);
		line_ch(&l, '/');
		line_dec(&l, rb_count, 0);
	}
	line_ch(&l, '\n');
	print(&l);
}

__attribute__((noreturn)) static void finish(void)
{
	struct line l;
	u64 t, rx;
	u32 s;

	echo_flush_partial();
	cli();
	t = ticks;
	rx = rx_total();
	s = sum_get();
	sti();

	line_reset(&l);
	line_str(&l, "[done] ticks=");
	line_dec(&l, t, 0);
	line_str(&l, " lines=");
	line_dec(&l, line_no, 0);
	line_str(&l, " rx=");
	line_dec(&l, rx, 0);
	line_str(&l, " sum=");
	line_hex(&l, s, 8);
	line_ch(&l, '\n');
	print(&l);

	tx_drain();
	cli();
	outb(EXIT_OK, DEBUG_EXIT_PORT);
	halt_forever();
}

/* ---- burst mode ----------------------------------------------------------- */

/*
 * `burst=N`: N lines `[bNNNN] pit=P sum=XXXXXXXX` back to back, as fast as
 * the interrupt-driven transmit path drains them (tx_write waits in
 * sti; hlt only while the TX ring is full), then the done line and exit.
 * The timer keeps ticking throughout. Each line folds its number and the
 * latched PIT count into the checksum, as a status line does.
 */
__attribute__((noreturn)) static void burst(u64 n)
{
	struct line l;
	u16 pit;
	u32 s;

	while (line_no < n) {
		line_no++;

		/*
		 * The PIT is read with interrupts on: nothing else touches it,
		 * and its port exits are where a VMM that injects interrupts
		 * only at exits with IF=1 (ftvm) can deliver the timer tick and
		 * the UART's THRE interrupt. Every other exit of a burst line
		 * (THR writes, the checksum) happens with interrupts off.
		 */
		pit = pit_read();
		cli();
		sum_u64(line_no);
		sum_u64(pit);
		s = sum_get();
		sti();

		line_reset(&l);
		line_str(&l, "[b");
		line_dec(&l, line_no, 4);
		line_str(&l, "] pit=");
		line_dec(&l, pit, 0);
		line_str(&l, " sum=");
		line_hex(&l, s, 8);
		line_ch(&l, '\n');
		print(&l);

		/* Input still echoes (none is expected in a benchmark). */
		rx_process();
	}
	finish();
}

/* ---- main loop ------------------------------------------------------------ */

/* `base`: the tick count the run's schedule starts from (0 unless a spin
 * came first). */
__attribute__((noreturn)) static void run(const struct config *c, u64 base)
{
	/* Period events happen every `period` ticks whether or not a status
	 * line is printed: they also flush a partially received echo line. */
	u64 period = c->lines ? c->hz / c->lines : c->hz;
	bool lines_on = c->lines && !c->quiet;
	u64 next_period = base + period;
	/* 0: run forever */
	u64 end_tick = c->seconds ? base + c->seconds * c->hz : 0;
	u64 next_service = base + c->hz;	/* once a second, see below */

	for (;;) {
		u64 now;

		cli();
		now = ticks;
		if (tx_stalled(now))
			tx_unstick();
		if (!rx_pending() && now < next_period && now < next_service &&
		    !(end_tick && now >= end_tick)) {
			sti_hlt();
			continue;
		}
		if (now >= next_service) {
			/* Safety net for a lost UART interrupt edge: one IIR
			 * read a second when all is well. */
			uart_service();
			next_service += c->hz;
		}
		sti();

		rx_process();
		if (now >= next_period) {
			echo_flush_partial();
			if (lines_on)
				status_line();
			next_period += period;
		}
		if (end_tick && now >= end_tick && next_period > end_tick)
			finish();
	}
}

void kmain(const char *cmd, u64 mem_bytes)
{
	struct config cfg;
	struct rtc_time rtc;
	struct line l;
	u64 base;
	u32 i;

	/* The IDT first, so that even a bad command-line pointer is reported. */
	idt_init();
	for (i = 0; cmd && i < CMDLINE_MAX - 1 && cmd[i]; i++)
		cmdline[i] = cmd[i];
	cmdline[i] = '\0';
	parse_cmdline(&cfg, mem_bytes, false);

	sum_init();
	pic_init();
	pit_init(cfg.hz);
	uart_init(cfg.hz);
	pic_unmask_used();
	sti();

	line_reset(&l);
	line_str(&l, "ftvm test guest: hz=");
	line_dec(&l, cfg.hz, 0);
	line_str(&l, " lines=");
	line_dec(&l, cfg.lines, 0);
	line_str(&l, " seconds=");
	line_dec(&l, cfg.seconds, 0);
	if (cfg.burst) {
		line_str(&l, " burst=");
		line_dec(&l, cfg.burst, 0);
	}
	line_str(&l, " mem=");
	line_dec(&l, mem_bytes >> 20, 0);
	line_str(&l, " MiB\n");
	print(&l);

	parse_cmdline(&cfg, mem_bytes, true);

	rtc_read(&rtc);
	line_reset(&l);
	line_str(&l, "[boot] rtc ");
	line_dec(&l, rtc.year, 4);
	line_ch(&l, '-');
	line_dec(&l, rtc.month, 2);
	line_ch(&l, '-');
	line_dec(&l, rtc.day, 2);
	line_ch(&l, ' ');
	line_dec(&l, rtc.hour, 2);
	line_ch(&l, ':');
	line_dec(&l, rtc.minute, 2);
	line_ch(&l, ':');
	line_dec(&l, rtc.second, 2);
	line_ch(&l, '\n');
	print(&l);

	if (cfg.spin0_on)
		spin_run(0, cfg.spin0, cfg.spinkb);
	if (cfg.spin3_on)
		spin_run(3, cfg.spin3, cfg.spinkb);
	if (cfg.burst)
		burst(cfg.burst);
	base = 0;
	if (cfg.spin0_on || cfg.spin3_on) {
		cli();
		base = ticks;
		sti();
	}
	run(&cfg, base);
}
