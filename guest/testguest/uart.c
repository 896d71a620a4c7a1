/*
 * ftvm built-in test guest: 16550 UART on COM1, interrupt-driven in both
 * directions.
 *
 * Transmit: bytes go into a 4 KiB ring. When the transmitter is idle the
 * first byte is written to THR directly; after that each THRE interrupt
 * refills the (empty) 16-byte FIFO from the ring. Receive: the interrupt
 * handler drains RBR while LSR.DR into an RX ring and folds each byte into
 * the running checksum. When the RX ring is full the receive interrupt is
 * switched off (bytes then wait in the UART, and the VMM holds further
 * input back) until the main loop has emptied half of it: the guest never
 * drops a byte. Ring state is only touched with interrupts off.
 */
#include "ftvm.h"

#define UART_RBR 0 /* read, DLAB=0 */
#define UART_THR 0 /* write, DLAB=0 */
#define UART_DLL 0 /* DLAB=1 */
#define UART_IER 1 /* DLAB=0 */
#define UART_DLM 1 /* DLAB=1 */
#define UART_IIR 2 /* read */
#define UART_FCR 2 /* write */
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_MSR 6

#define LCR_8N1 0x03
#define LCR_DLAB 0x80
#define FCR_ENABLE_CLEAR 0x07
#define MCR_DTR_RTS_OUT2 0x0b
#define IER_RDA_THRE 0x03
#define IER_THRE 0x02
#define IIR_NO_INT 0x01
#define IIR_ID_MASK 0x0f
#define IIR_ID_MODEM 0x00
#define LSR_DR 0x01
#define LSR_OE 0x02
#define LSR_THRE 0x20
#define LSR_TEMT 0x40

#define FIFO_DEPTH 16
#define TX_SIZE 4096
#define RX_SIZE 1024
/* Bounds on loops over device registers, so a misbehaving device cannot
 * hang the guest with interrupts off. */
#define SERVICE_ROUNDS_MAX (TX_SIZE / FIFO_DEPTH + 64)
#define RX_DRAIN_MAX 256
#define POLL_MAX 100000

static u8 tx_ring[TX_SIZE];
static u32 tx_head;	/* next byte to send */
static u32 tx_count;
static bool tx_busy;	/* bytes handed to the UART, a THRE interrupt due */
static u64 tx_progress_tick;
static u64 tx_stall_ticks;

static u8 rx_ring[RX_SIZE];
static u32 rx_head;	/* next byte to take */
static u32 rx_count;
static u64 rx_bytes;
static bool rx_throttled;	/* receive interrupt off: ring full */
static u64 rx_overruns;		/* LSR.OE seen: the UART lost bytes */

void uart_init(u64 hz)
{
	tx_stall_ticks = hz / 50;
	if (tx_stall_ticks < 2)
		tx_stall_ticks = 2;

	outb(0x00, COM1 + UART_IER);
	outb(LCR_DLAB, COM1 + UART_LCR);
	outb(1, COM1 + UART_DLL);		/* 115200 baud */
	outb(0, COM1 + UART_DLM);
	outb(LCR_8N1, COM1 + UART_LCR);
	outb(FCR_ENABLE_CLEAR, COM1 + UART_FCR);
	outb(MCR_DTR_RTS_OUT2, COM1 + UART_MCR);
	outb(IER_RDA_THRE, COM1 + UART_IER);
}

/* Interrupts off. Writes up to `max` bytes from the ring to THR. */
static void tx_send(u32 max)
{
	u32 n = 0;

	while (tx_count && n < max) {
		outb(tx_ring[tx_head], COM1 + UART_THR);
		tx_head = (tx_head + 1) % TX_SIZE;
		tx_count--;
		n++;
	}
	if (n) {
		tx_busy = true;
		tx_progress_tick = ticks;
	}
}

/* Interrupts off. LSR says THR/FIFO empty: refill it, or go idle. */
static void tx_on_thre(void)
{
	if (tx_count)
		tx_send(FIFO_DEPTH);
	else
		tx_busy = false;
}

/* Interrupts off; the caller checked there is room. */
static void rx_byte(u8 b)
{
	rx_bytes++;
	sum_byte(b);
	rx_ring[(rx_head + rx_count) % RX_SIZE] = b;
	rx_count++;
}

/* Interrupts off. Counts overruns the UART reports. */
static u8 read_lsr(void)
{
	u8 lsr = inb(COM1 + UART_LSR);

	if (lsr & LSR_OE)
		rx_overruns++;
	return lsr;
}

void uart_service(void)
{
	u32 round, k;

	/*
	 * The PIC is edge-triggered: keep going until the UART reports no
	 * pending interrupt, so its line drops and the next event is a new
	 * edge. Sending when LSR.THRE is set regardless of which source IIR
	 * names means a THRE interrupt is never left unserved.
	 */
	for (round = 0; round < SERVICE_ROUNDS_MAX; round++) {
		u8 iir = inb(COM1 + UART_IIR);
		u8 lsr;

		if (iir & IIR_NO_INT)
			break;
		lsr = read_lsr();
		for (k = 0; (lsr & LSR_DR) && k < RX_DRAIN_MAX; k++) {
			if (rx_count == RX_SIZE) {
				/* Leave the rest in the UART; rx_take resumes. */
				rx_throttled = true;
				outb(IER_THRE, COM1 + UART_IER);
				break;
			}
			rx_byte(inb(COM1 + UART_RBR));
			lsr = read_lsr();
		}
		if (lsr & LSR_THRE)
			tx_on_thre();
		if ((iir & IIR_ID_MASK) == IIR_ID_MODEM)
			(void)inb(COM1 + UART_MSR);
	}
}

void tx_write(const char *s, u32 n)
{
	while (n) {
		u32 space, chunk, tail, i;

		cli();
		while (tx_count == TX_SIZE) {
			if (tx_stalled(ticks))
				tx_unstick();
			sti_hlt();
			cli();
		}
		space = TX_SIZE - tx_count;
		chunk = n < space ? n : space;
		tail = (tx_head + tx_count) % TX_SIZE;
		for (i = 0; i < chunk; i++) {
			tx_ring[tail] = (u8)s[i];
			tail = (tail + 1) % TX_SIZE;
		}
		tx_count += chunk;
		s += chunk;
		n -= chunk;
		if (!tx_busy)
			tx_send(1);
		sti();
	}
}

void tx_line(const struct line *l)
{
	tx_write(l->b, l->n);
}

bool tx_stalled(u64 now)
{
	return tx_busy && tx_count && now - tx_progress_tick >= tx_stall_ticks;
}

void tx_unstick(void)
{
	u8 lsr = read_lsr();

	if (lsr & LSR_THRE)
		tx_on_thre();
	else
		tx_progress_tick = ticks;	/* still sending: look again later */
	uart_service();
}

void uart_poll_wait_temt(void)
{
	u32 i;

	for (i = 0; i < POLL_MAX; i++)
		if (inb(COM1 + UART_LSR) & LSR_TEMT)
			break;
}

void tx_drain(void)
{
	cli();
	while (tx_count) {
		if (tx_stalled(ticks))
			tx_unstick();
		sti_hlt();
		cli();
	}
	sti();
	/* The one permitted short poll: wait for the shift register. */
	uart_poll_wait_temt();
}

u32 rx_take(u8 *buf, u32 max, u64 *overruns)
{
	u32 n = 0;

	while (rx_count && n < max) {
		buf[n++] = rx_ring[rx_head];
		rx_head = (rx_head + 1) % RX_SIZE;
		rx_count--;
	}
	if (rx_throttled && rx_count <= RX_SIZE / 2) {
		/* Data still waiting in the UART raises a fresh interrupt. */
		rx_throttled = false;
		outb(IER_RDA_THRE, COM1 + UART_IER);
	}
	*overruns = rx_overruns;
	rx_overruns = 0;
	return n;
}

bool rx_pending(void)
{
	return rx_count != 0 || rx_overruns != 0;
}

u64 rx_total(void)
{
	return rx_bytes;
}

static void poll_putc(u8 c)
{
	u32 i;

	for (i = 0; i < POLL_MAX; i++)
		if (inb(COM1 + UART_LSR) & LSR_THRE)
			break;
	outb(c, COM1 + UART_THR);
}

void uart_poll_flush_ring(void)
{
	u32 n = tx_count <= TX_SIZE ? tx_count : TX_SIZE;

	while (n--) {
		poll_putc(tx_ring[tx_head % TX_SIZE]);
		tx_head = (tx_head + 1) % TX_SIZE;
	}
	tx_count = 0;
}

void uart_poll_line(const struct line *l)
{
	u32 i;

	for (i = 0; i < l->n; i++)
		poll_putc((u8)l->b[i]);
}
