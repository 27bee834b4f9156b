#!/bin/bash
# vm.sh boot|restore DIR [extra qemu args...]
# boot: fresh boot with shared file RAM (like a build VM). restore: -incoming defer, RAM file private.
mode=$1; D=$2; shift 2; mkdir -p $D
K=/boot/vmlinuz-6.1.0-57-cloud-amd64; I=${R17:-/tmp/research-17}/initrd.cpio
ACC=${ACC:-tcg,thread=single}; MEM=${MEM:-256}
case $ACC in tcg*) XKARGS="tsc_early_khz=2299998 tsc=reliable no_timer_check";; esac
if [ $mode = boot ]; then
  rm -f $D/memory.ram; truncate -s ${MEM}M $D/memory.ram
  RAM="memory-backend-file,id=mem0,size=${MEM}M,mem-path=$D/memory.ram,share=on"
  KARGS=(-kernel $K -initrd $I -append "console=ttyS0 panic=-1 edd=off $XKARGS")
else
  RAM="memory-backend-file,id=mem0,size=${MEM}M,mem-path=${SRC:-$D}/memory.ram,share=off,readonly=on,rom=off"
  KARGS=(-incoming defer)
fi
rm -f $D/serial.sock $D/qmp.sock
qemu-system-x86_64 -M microvm,memory-backend=mem0 -accel $ACC -m $MEM -smp 1 -display none -monitor none -no-reboot \
  "${KARGS[@]}" -object $RAM -chardev socket,id=ser,path=$D/serial.sock,server=on,wait=off,logfile=$D/console.log,logappend=on -serial chardev:ser -qmp unix:$D/qmp.sock,server=on,wait=off \
  -device virtio-serial-device -chardev socket,id=agent,path=$D/agent.sock,server=on,wait=off -device virtserialport,chardev=agent,name=agent \
  -pidfile $D/qemu.pid "$@" > $D/qemu.log 2>&1 &
for i in $(seq 100); do [ -S $D/qmp.sock ] && [ -S $D/serial.sock ] && break; sleep 0.05; done
